"""Typed dependencies for what the lifespan builds; tests swap them via dependency_overrides.

Every dependency is `async def`, however trivial: FastAPI runs a plain `def` in its thread pool,
a hand-off to a thread and back on every request."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.context.prompts import PromptProfiles
from chatbot.errors import BadRequest
from chatbot.llm.client import LLMClient
from chatbot.streams.follow import ReplyFollower
from chatbot.streams.registry import ReplyRegistry
from chatbot.tools.registry import ToolRegistry


def app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency returning what the lifespan stored as `app.state.<name>`."""

    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


get_settings: Callable[[Request], Awaitable[Settings]] = app_state("settings")
get_sessionmaker: Callable[[Request], Awaitable[async_sessionmaker[AsyncSession]]] = app_state(
    "sessionmaker"
)
get_llm: Callable[[Request], Awaitable[LLMClient]] = app_state("llm")
get_registry: Callable[[Request], Awaitable[ReplyRegistry]] = app_state("registry")
get_profiles: Callable[[Request], Awaitable[PromptProfiles]] = app_state("profiles")
get_context_builder: Callable[[Request], Awaitable[ContextBuilder]] = app_state("context_builder")
get_follower: Callable[[Request], Awaitable[ReplyFollower]] = app_state("follower")
get_tools: Callable[[Request], Awaitable[ToolRegistry]] = app_state("tools")
get_stream_signer: Callable[[Request], Awaitable[StreamTokenSigner]] = app_state("stream_signer")


async def get_session(
    sessionmaker: Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as session:
        yield session


async def reject_repeated_query(request: Request) -> None:
    """Every query parameter here takes one value: `?model=a&model=b` is refused, not guessed at."""
    params = request.query_params
    if len(params.multi_items()) > len(params):  # len() counts distinct names
        repeated = sorted(key for key in params if len(params.getlist(key)) > 1)
        raise BadRequest(
            f"Query parameters may appear once: {', '.join(repeated)}",
            code="repeated_parameter",
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
# Closed as soon as the endpoint returns, so a streaming response never holds a connection.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
LLMDep = Annotated[LLMClient, Depends(get_llm)]
RegistryDep = Annotated[ReplyRegistry, Depends(get_registry)]
FollowerDep = Annotated[ReplyFollower, Depends(get_follower)]
ProfilesDep = Annotated[PromptProfiles, Depends(get_profiles)]
ContextBuilderDep = Annotated[ContextBuilder, Depends(get_context_builder)]
ToolsDep = Annotated[ToolRegistry, Depends(get_tools)]
StreamSignerDep = Annotated[StreamTokenSigner, Depends(get_stream_signer)]
