"""`chatbot mcp`: the service's own toolsets (the task list) served over MCP, so that other MCP
clients (desktop assistants, IDEs) use the same tasks as the chat.

Every call acts for the user the transport establishes, never for one a tool argument names:
over stdio, the JWT in `CHATBOT_MCP_TOKEN`, checked like any request's (or, with authentication
off, `CHATBOT_MCP_USER`); over streamable HTTP, the Bearer JWT of each request."""

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import mcp_types as types
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from pydantic import AnyHttpUrl
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from chatbot import __version__
from chatbot.auth.tokens import verify_token
from chatbot.config import ConfigError, Settings
from chatbot.db import create_engine, create_sessionmaker, migrate
from chatbot.errors import Unauthorized
from chatbot.tasks.tools import TASKS
from chatbot.tools.base import Tool, ToolContext, ToolResult, Toolset, error_result, run_tool

logger = logging.getLogger(__name__)


def build_server(
    settings: Settings,
    toolsets: Sequence[Toolset],
    sessionmaker: async_sessionmaker[AsyncSession],
    user_of_call: Callable[[], str],
) -> Server:
    """The MCP server of `toolsets`; `user_of_call` names the user of the call being handled,
    from the transport."""
    tools: dict[str, Tool] = {tool.name: tool for toolset in toolsets for tool in toolset.tools}

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=tool.name, description=tool.description, input_schema=tool.parameters
                )
                for tool in tools.values()
            ]
        )

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        result = await _result(params)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=result.content)],
            is_error=result.status == "error",
        )

    async def _result(params: types.CallToolRequestParams) -> ToolResult:
        try:
            user_id = user_of_call()
        except (ConfigError, Unauthorized):
            return error_result("the credentials of this server are not valid")
        tool = tools.get(params.name)
        if tool is None:
            return error_result(f"there is no tool named {params.name!r}")
        return await run_tool(
            tool,
            ToolContext(user_id, sessionmaker),
            json.dumps(params.arguments or {}),
            timeout_seconds=settings.tool_timeout_seconds,
            max_result_chars=settings.tool_max_result_chars,
        )

    return Server(
        "chatbot",
        version=__version__,
        instructions="The user's own task list: add, list, complete, update and delete tasks.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def stdio_user(settings: Settings) -> str:
    """The user a stdio server acts for: its token's subject, or the configured local user."""
    if settings.auth_mode == "none":
        return settings.mcp_user
    if settings.mcp_token is None:
        raise ConfigError(
            "CHATBOT_MCP_TOKEN is not set: with authentication on, `chatbot mcp` acts for the "
            "user of that token (`chatbot token USER` prints one)"
        )
    try:
        return verify_token(settings, settings.mcp_token.get_secret_value())
    except Unauthorized as exc:
        raise ConfigError(f"CHATBOT_MCP_TOKEN is not a valid token: {exc.detail}") from None


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """What either transport serves from: the service's database, migrated if it migrates."""
    settings.check_startup()
    engine = create_engine(settings.database_url)
    try:
        if settings.should_auto_migrate:
            await migrate(engine)
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


async def serve_stdio(settings: Settings) -> None:
    async with _database(settings) as sessionmaker:
        user_id = stdio_user(settings)
        # The token is checked again at every call: an expired or revoked one stops serving.
        server = build_server(settings, [TASKS], sessionmaker, lambda: stdio_user(settings))
        logger.info("MCP over stdio: the task tools of user %s", user_id)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())


class _JWTVerifier:
    """Bearer tokens of the MCP endpoint: the service's own JWTs, checked as the API checks them."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            user_id = verify_token(self._settings, token)
        except Unauthorized:
            return None
        return AccessToken(token=token, client_id=user_id, scopes=[], subject=user_id)


def _user_of_request(settings: Settings) -> str:
    if settings.auth_mode == "none":
        return settings.mcp_user
    token = get_access_token()
    if token is None or not token.subject:  # the bearer middleware lets none through
        raise Unauthorized()
    return token.subject


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def http_app(settings: Settings, sessionmaker: async_sessionmaker[AsyncSession]) -> Starlette:
    """Streamable HTTP at `/mcp`, each request acting for the subject of its Bearer JWT."""
    server = build_server(settings, [TASKS], sessionmaker, lambda: _user_of_request(settings))
    if settings.auth_mode == "none":
        return server.streamable_http_app(host=settings.host)
    return server.streamable_http_app(
        host=settings.host,
        auth=AuthSettings(
            issuer_url=AnyHttpUrl(f"http://{_url_host(settings.host)}:{settings.mcp_port}"),
            resource_server_url=None,
        ),
        token_verifier=_JWTVerifier(settings),
    )


async def serve_http(settings: Settings) -> None:
    import uvicorn

    async with _database(settings) as sessionmaker:
        config = uvicorn.Config(
            http_app(settings, sessionmaker),
            host=settings.host,
            port=settings.mcp_port,
            log_level=settings.log_level.lower(),
        )
        logger.info(
            "MCP over streamable HTTP at http://%s:%d/mcp", settings.host, settings.mcp_port
        )
        await uvicorn.Server(config).serve()
