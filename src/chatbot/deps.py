"""Typed dependencies for what the lifespan builds. Tests may swap `get_replies` through
`dependency_overrides`; the hot routes read the rest from the state itself (below).

Every dependency is `async def`, however trivial: FastAPI runs a plain `def` in its thread pool,
a hand-off to a thread and back on every request. Those on the hot routes read what they need
from `StateDep` rather than from one dependency per part: each dependency FastAPI solves costs
some tens of microseconds on every request, whatever it returns."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.errors import RepeatedParameter
from chatbot.llm.client import LLMClient
from chatbot.prompts import PromptProfiles
from chatbot.quotas.service import OpenStreams, RequestRateLimiter
from chatbot.replies.service import Replies
from chatbot.state import AppState, state_of
from chatbot.tools.registry import ToolRegistry


async def get_state(request: Request) -> AppState:
    return state_of(request.app)


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_sessionmaker(state: StateDep) -> async_sessionmaker[AsyncSession]:
    return state.sessionmaker


async def get_llm(state: StateDep) -> LLMClient:
    return state.llm


async def get_replies(state: StateDep) -> Replies:
    return state.replies


async def get_profiles(state: StateDep) -> PromptProfiles:
    return state.profiles


async def get_context_builder(state: StateDep) -> ContextBuilder:
    return state.context


async def get_tools(state: StateDep) -> ToolRegistry:
    return state.tools


async def get_stream_signer(state: StateDep) -> StreamTokenSigner:
    return state.stream_signer


async def get_rate_limiter(state: StateDep) -> RequestRateLimiter:
    return state.rate_limiter


async def get_open_streams(state: StateDep) -> OpenStreams:
    return state.open_streams


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    async with state.sessionmaker() as session:
        yield session


async def reject_repeated_query(request: Request) -> None:
    """Every query parameter here takes one value: `?model=a&model=b` is refused, not guessed at."""
    params = request.query_params
    if len(params.multi_items()) > len(params):  # len() counts distinct names
        repeated = sorted(key for key in params if len(params.getlist(key)) > 1)
        raise RepeatedParameter(f"Query parameters may appear once: {', '.join(repeated)}")


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
# Closed as soon as the endpoint returns, so a streaming response never holds a connection.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
LLMDep = Annotated[LLMClient, Depends(get_llm)]
RepliesDep = Annotated[Replies, Depends(get_replies)]
ProfilesDep = Annotated[PromptProfiles, Depends(get_profiles)]
ContextBuilderDep = Annotated[ContextBuilder, Depends(get_context_builder)]
ToolsDep = Annotated[ToolRegistry, Depends(get_tools)]
StreamSignerDep = Annotated[StreamTokenSigner, Depends(get_stream_signer)]
RateLimiterDep = Annotated[RequestRateLimiter, Depends(get_rate_limiter)]
OpenStreamsDep = Annotated[OpenStreams, Depends(get_open_streams)]
