"""What the lifespan builds once per process, as one typed object that every dependency reads."""

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.context.chores import Chores
from chatbot.llm.client import LLMClient
from chatbot.prompts import PromptProfiles
from chatbot.quotas.service import OpenStreams, RequestRateLimiter
from chatbot.replies.service import Replies
from chatbot.tools.registry import ToolRegistry

_KEY = "chatbot"


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    llm: LLMClient
    profiles: PromptProfiles
    context: ContextBuilder
    chores: Chores
    tools: ToolRegistry
    replies: Replies
    stream_signer: StreamTokenSigner
    rate_limiter: RequestRateLimiter
    open_streams: OpenStreams


def attach(app: Starlette, state: AppState) -> None:
    setattr(app.state, _KEY, state)


def state_of(app: Starlette) -> AppState:
    """The running app's state (the one place that reads `app.state`)."""
    state = getattr(app.state, _KEY, None)
    if not isinstance(state, AppState):
        raise RuntimeError("the app has not started: its lifespan builds the state")
    return state
