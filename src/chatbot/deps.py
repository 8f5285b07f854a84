"""Typed dependencies for what the lifespan builds; tests swap them via dependency_overrides."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.llm.client import LLMClient
from chatbot.streams.registry import GenerationRegistry


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


def get_registry(request: Request) -> GenerationRegistry:
    registry: GenerationRegistry = request.app.state.registry
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
# Closed as soon as the endpoint returns, so a streaming response never holds a connection.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
LLMDep = Annotated[LLMClient, Depends(get_llm)]
RegistryDep = Annotated[GenerationRegistry, Depends(get_registry)]
