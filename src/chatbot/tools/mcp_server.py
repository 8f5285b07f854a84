"""`chatbot mcp`: the service's own toolsets (the task list) served over MCP, so that other MCP
clients (desktop assistants, IDEs) use the same tasks as the chat.

Every call acts for the user the transport establishes, never for one a tool argument names:
over stdio, the JWT in `CHATBOT_MCP_TOKEN`, checked like any request's (or, with authentication
off, `CHATBOT_MCP_USER`)."""

import json
import logging
from collections.abc import Sequence
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from chatbot import __version__
from chatbot.auth.tokens import verify_token
from chatbot.config import ConfigError, Settings
from chatbot.db import create_engine, create_sessionmaker, migrate
from chatbot.errors import Unauthorized
from chatbot.tasks.tools import TASKS
from chatbot.tools.base import Tool, ToolContext, Toolset, run_tool

logger = logging.getLogger(__name__)


def build_server(settings: Settings, toolsets: Sequence[Toolset], context: ToolContext) -> Server:
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
        tool = tools.get(params.name)
        if tool is None:
            text, failed = json.dumps({"error": f"there is no tool named {params.name!r}"}), True
        else:
            result = await run_tool(
                tool,
                context,
                json.dumps(params.arguments or {}),
                timeout_seconds=settings.tool_timeout_seconds,
                max_result_chars=settings.tool_max_result_chars,
            )
            text, failed = result.content, result.status == "error"
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], is_error=failed
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


async def serve_stdio(settings: Settings) -> None:
    user_id = stdio_user(settings)
    engine = create_engine(settings.database_url)
    try:
        if settings.should_auto_migrate:
            await migrate(engine)
        server = build_server(settings, [TASKS], ToolContext(user_id, create_sessionmaker(engine)))
        logger.info("MCP over stdio: the task tools of user %s", user_id)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await engine.dispose()
