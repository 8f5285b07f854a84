from typing import Annotated

from fastapi import Depends, Query, Request

from chatbot.auth.tokens import TOKEN_PATTERN, checked_user_id, verify_token
from chatbot.config import Settings, is_loopback_host
from chatbot.deps import StateDep
from chatbot.errors import Unauthorized

LOCAL_USER = "local"

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def current_user(request: Request, state: StateDep) -> str:
    """The caller, from a Bearer JWT (or, locally, X-User-Id), once admitted by the rate limit."""
    user_id = identify(request, state.settings)
    await state.rate_limiter.admit(user_id)
    return user_id


def identify(request: Request, settings: Settings) -> str:
    if settings.auth_mode == "none":
        # Defence in depth: even if the process was started some other way, an
        # unauthenticated service answers only on loopback.
        server = request.scope.get("server")
        if server and not is_loopback_host(str(server[0])):
            raise Unauthorized("Authentication is required on this address", headers=_CHALLENGE)
        return checked_user_id(request.headers.get("x-user-id", LOCAL_USER))
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("A Bearer token is required", headers=_CHALLENGE)
    try:
        return verify_token(settings, token.strip())
    except Unauthorized as exc:
        exc.headers = _CHALLENGE
        raise


CurrentUser = Annotated[str, Depends(current_user)]


AccessTokenQuery = Annotated[
    str | None,
    Query(
        description="The access token, for EventSource clients that cannot send headers",
        max_length=8192,
        pattern=TOKEN_PATTERN,
    ),
]


async def streaming_user(
    request: Request, state: StateDep, access_token: AccessTokenQuery = None
) -> str:
    """`current_user`, also accepting `?access_token=` on the GET routes EventSource opens."""
    settings = state.settings
    if access_token and settings.auth_mode == "jwt" and "authorization" not in request.headers:
        user_id = verify_token(settings, access_token)
        await state.rate_limiter.admit(user_id)
        return user_id
    return await current_user(request, state)


StreamingUser = Annotated[str, Depends(streaming_user)]
