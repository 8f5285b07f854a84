"""Typed dependencies for what the lifespan builds; tests swap them via dependency_overrides."""

from collections.abc import AsyncIterator
from typing import Annotated

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


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return sessionmaker


async def get_session(
    sessionmaker: Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as session:
        yield session


def get_llm(request: Request) -> LLMClient:
    llm: LLMClient = request.app.state.llm
    return llm


def get_registry(request: Request) -> ReplyRegistry:
    registry: ReplyRegistry = request.app.state.registry
    return registry


def get_profiles(request: Request) -> PromptProfiles:
    profiles: PromptProfiles = request.app.state.profiles
    return profiles


def get_context_builder(request: Request) -> ContextBuilder:
    builder: ContextBuilder = request.app.state.context_builder
    return builder


def get_follower(request: Request) -> ReplyFollower:
    follower: ReplyFollower = request.app.state.follower
    return follower


def get_stream_signer(request: Request) -> StreamTokenSigner:
    signer: StreamTokenSigner = request.app.state.stream_signer
    return signer


def reject_repeated_query(request: Request) -> None:
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
StreamSignerDep = Annotated[StreamTokenSigner, Depends(get_stream_signer)]
