"""The application: built once per process by `create_app`, wired in its lifespan."""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from chatbot import __version__, health
from chatbot.auth.stream_tokens import StreamTokenSigner
from chatbot.chat.idempotency import purge_forever
from chatbot.chat.router import router as chat_router
from chatbot.config import ConfigError, Settings
from chatbot.context.builder import ContextBuilder
from chatbot.context.chores import Chores
from chatbot.context.router import router as context_router
from chatbot.context.tokens import TokenCounter
from chatbot.conversations.router import router as conversations_router
from chatbot.db import create_engine, create_sessionmaker, migrate
from chatbot.deps import reject_repeated_query
from chatbot.errors import API_ERRORS, install_error_handlers
from chatbot.llm.client import LLMClient
from chatbot.llm.demo import DEMO_MODEL, DemoChatClient
from chatbot.llm.openai_client import OpenAIChatClient
from chatbot.llm.windows import ContextWindows
from chatbot.logs import quiet_libraries
from chatbot.messages.router import router as messages_router
from chatbot.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from chatbot.prompts import PromptProfiles, UnknownProfile
from chatbot.quotas.service import OpenStreams, RequestRateLimiter
from chatbot.replies.service import Replies
from chatbot.state import AppState, attach
from chatbot.streams.router import router as streams_router
from chatbot.tasks.tools import TASKS
from chatbot.tools.base import Toolset
from chatbot.tools.mcp_client import start_sources
from chatbot.tools.registry import ToolRegistry
from chatbot.validation import SETTING_MARK
from chatbot.web.docs import docs_router
from chatbot.web.router import router as web_router

logger = logging.getLogger(__name__)


def build_llm(settings: Settings) -> LLMClient:
    if settings.uses_demo_model:
        logger.warning(
            "no OPENAI_API_KEY or OPENAI_BASE_URL: replies come from the offline demo model (%s)",
            DEMO_MODEL,
        )
        return DemoChatClient(delay_seconds=settings.demo_delay_ms / 1000)
    logger.info(
        "model provider: %s, default model %s",
        settings.openai_base_url or "OpenAI",
        settings.model,
    )
    return OpenAIChatClient(settings)


def context_windows(settings: Settings, model: LLMClient) -> ContextWindows:
    """Where prompts learn their model's window: the client's, which asks its server; the
    demo's own; for another client, the setting or the table."""
    if isinstance(model, OpenAIChatClient):
        return model.windows
    return ContextWindows(settings, demo=isinstance(model, DemoChatClient))


def _document_settings(app: FastAPI, constraints: dict[str, dict[str, Any]]) -> None:
    """Write the limits that settings decide (profile names, the output cap) into the schema."""
    build = app.openapi

    def fill(node: Any) -> None:
        if isinstance(node, dict):
            if SETTING_MARK in node:
                node.update(constraints[node.pop(SETTING_MARK)])
            for value in node.values():
                fill(value)
        elif isinstance(node, list):
            for value in node:
                fill(value)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            fill(build())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None,
    *,
    llm: LLMClient | None = None,
    toolsets: Iterable[Toolset] = (),
) -> FastAPI:
    """The service; `toolsets` are tools written in Python that conversations may name, beside
    the built-in task list."""
    settings = settings or Settings()
    settings.check_startup()
    quiet_libraries()
    try:
        profiles = PromptProfiles.from_directory(settings.prompts_dir, settings.prompt_profile)
    except UnknownProfile as exc:
        raise ConfigError(
            f"CHATBOT_PROMPT_PROFILE: {exc.detail} in {settings.prompts_dir}"
        ) from None
    tools = ToolRegistry(settings, (TASKS, *toolsets))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout,
            connect_timeout=settings.db_connect_timeout,
            statement_timeout=settings.db_statement_timeout,
        )
        if settings.should_auto_migrate:
            # Not under the statement timeout: building an index may take its time.
            migrating = create_engine(settings.database_url, pool_size=1, max_overflow=0)
            try:
                await migrate(migrating)
            finally:
                await migrating.dispose()
        sessionmaker = create_sessionmaker(engine)
        rate_limiter = RequestRateLimiter(settings)
        model = llm or build_llm(settings)
        windows = context_windows(settings, model)
        counter = TokenCounter()
        # Load the default model's vocabulary now, not on the first request; and ask its
        # server for its context window, without holding up the start.
        await asyncio.to_thread(counter.encoder_for, settings.model)
        probing = asyncio.create_task(windows.get(settings.model), name="context-window")
        builder = ContextBuilder(settings, counter, profiles, windows)
        chores = Chores(
            settings,
            sessionmaker,
            builder,
            utility=None if settings.uses_demo_model and llm is None else model,
            tools=tools,
        )
        replies = Replies(settings, sessionmaker, model, counter, after_reply=chores.after_reply)
        await replies.open()
        # Start-up waits for the MCP servers at most their connect timeout, all at once; one
        # that is slow or down is retried in the background.
        mcp_sources = await start_sources(settings.mcp_servers)
        tools.attach(mcp_sources)
        attach(
            app,
            AppState(
                settings=settings,
                engine=engine,
                sessionmaker=sessionmaker,
                llm=model,
                profiles=profiles,
                context=builder,
                chores=chores,
                tools=tools,
                replies=replies,
                stream_signer=StreamTokenSigner.from_settings(settings),
                rate_limiter=rate_limiter,
                open_streams=OpenStreams(settings.max_streams_per_user),
            ),
        )
        purging = asyncio.create_task(purge_forever(sessionmaker), name="idempotency-purge")
        logger.info("authentication: %s", settings.auth_mode)
        try:
            yield
        finally:
            await replies.aclose()
            await chores.shutdown()
            await asyncio.gather(*(source.aclose() for source in mcp_sources))
            purging.cancel()
            await asyncio.gather(purging, return_exceptions=True)
            await windows.aclose()
            await asyncio.gather(probing, return_exceptions=True)
            await model.aclose()
            await rate_limiter.aclose()
            await engine.dispose()

    app = FastAPI(
        # /docs and /redoc are routes of web/docs.py: FastAPI's own load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
        title="chatbot",
        version=__version__,
        summary="Persistent conversations with any OpenAI-compatible model, streamed over SSE.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "X-Request-ID",
                "Last-Event-ID",
            ],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestIdMiddleware)
    _document_settings(
        app,
        {
            "prompt_profiles": {"enum": profiles.names},
            "max_output_tokens": {"maximum": settings.max_output_tokens},
            "toolsets": {"enum": tools.names},
        },
    )
    app.include_router(health.router)
    for router in (
        conversations_router,
        messages_router,
        chat_router,
        streams_router,
        context_router,
    ):
        app.include_router(
            router, responses=API_ERRORS, dependencies=[Depends(reject_repeated_query)]
        )
    app.include_router(web_router)
    if app.openapi_url is not None:
        app.include_router(docs_router(title=app.title, openapi_url=app.openapi_url))
    return app
