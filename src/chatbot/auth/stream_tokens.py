"""Short-lived tokens in `stream_url`s, since `EventSource` cannot send an Authorization header.

Each is bound to one message and one user, and signed with a key derived from (never equal to)
the JWT secret, so a stream token can never pass as an access token or the other way round.
"""

import hashlib
import hmac
import secrets
import time
import uuid

import jwt

from chatbot.auth.errors import InvalidToken, TokenExpired
from chatbot.auth.tokens import checked_user_id
from chatbot.config import Settings

_PURPOSE = b"chatbot stream token v1"


class StreamTokenSigner:
    def __init__(self, key: bytes, ttl_seconds: int) -> None:
        self._key = key
        self._ttl = ttl_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> "StreamTokenSigner":
        # Without a JWT secret (local use) the key is the process's own, or one its worker
        # processes share (`chatbot serve --workers` sets it): nothing else verifies it.
        if settings.jwt_secret:
            secret = settings.jwt_secret.get_secret_value().encode()
        elif settings.stream_token_secret:
            secret = settings.stream_token_secret.get_secret_value().encode()
        else:
            secret = secrets.token_bytes(32)
        key = hmac.new(secret, _PURPOSE, hashlib.sha256).digest()
        return cls(key, settings.stream_token_ttl)

    def issue(self, user_id: str, message_id: uuid.UUID) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "mid": str(message_id), "iat": now, "exp": now + self._ttl}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify(self, token: str, message_id: uuid.UUID) -> str:
        """The user the token was issued to, if it is valid for this message."""
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"require": ["sub", "mid", "exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("The stream token has expired") from None
        except jwt.PyJWTError:
            raise InvalidToken("The stream token is not valid") from None
        if claims["mid"] != str(message_id):
            raise InvalidToken("The stream token is for another message")
        return checked_user_id(claims["sub"])
