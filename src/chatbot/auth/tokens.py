"""JWT issue and verification (HS256 with the shared secret from settings)."""

import hashlib
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


VERIFIED_CACHE_SIZE = 4096
"""Tokens remembered as verified. A client sends the same token with every request until it
expires, and checking its signature and claims again costs more than the rest of the request's
authentication; only tokens that passed are kept, so forged ones cannot fill it."""

_verified: dict[tuple[bytes, tuple[Any, ...]], tuple[str, float]] = {}


def _verifier(settings: Settings) -> tuple[Any, ...]:
    """What a verification depends on besides the token and the time."""
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    return (secret, settings.jwt_audience, settings.jwt_issuer, settings.jwt_leeway_seconds)


def verify_token(settings: Settings, token: str) -> str:
    """Return the user id (`sub`) of a valid token; anything else is a 401.

    A token verified before is taken from memory while it has not expired: what else a
    verification checks (signature, audience, issuer, a `nbf` or `iat` not in the future) does
    not change with time, or only in the token's favour."""
    if settings.jwt_secret is None:
        raise Unauthorized()
    key = (hashlib.blake2b(token.encode(), digest_size=16).digest(), _verifier(settings))
    if (known := _verified.get(key)) is not None:
        user_id, expires = known
        if time.time() < expires:  # as PyJWT: expired from `exp` + leeway on
            return user_id
        del _verified[key]
        raise TokenExpired()
    user_id, expires = _verify(settings, token)
    if len(_verified) >= VERIFIED_CACHE_SIZE:
        del _verified[next(iter(_verified))]  # the oldest
    _verified[key] = (user_id, expires)
    return user_id


def _verify(settings: Settings, token: str) -> tuple[str, float]:
    """The user id and the time past which the token is refused as expired."""
    assert settings.jwt_secret is not None
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
    return checked_user_id(claims.get("sub")), int(claims["exp"]) + settings.jwt_leeway_seconds
