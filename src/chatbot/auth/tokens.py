"""JWT issue and verification (HS256 with the shared secret from settings)."""

import time
from typing import Any

import jwt

from chatbot.auth.errors import InvalidToken, InvalidUserId, TokenExpired
from chatbot.config import Settings
from chatbot.errors import Unauthorized
from chatbot.ids import is_user_id

ALGORITHM = "HS256"
TOKEN_PATTERN = r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$"
"""A compact JWS, as written in a URL."""


def checked_user_id(value: object) -> str:
    if not is_user_id(value):
        raise InvalidUserId()
    assert isinstance(value, str)
    return value


def issue_token(settings: Settings, user_id: str, *, ttl_seconds: int = 3600) -> str:
    if settings.jwt_secret is None:
        raise ValueError("CHATBOT_JWT_SECRET is not set")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": checked_user_id(user_id), "iat": now, "exp": now + ttl_seconds}
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM)


def verify_token(settings: Settings, token: str) -> str:
    """Return the user id (`sub`) of a valid token; anything else is a 401."""
    if settings.jwt_secret is None:
        raise Unauthorized()
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[ALGORITHM],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_seconds,
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired() from None
    except jwt.PyJWTError:
        raise InvalidToken() from None
    return checked_user_id(claims.get("sub"))
