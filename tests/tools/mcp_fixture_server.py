"""A small third-party MCP server for the client tests: `python tests/tools/mcp_fixture_server.py`
serves over stdio, `... --http PORT` over streamable HTTP at /mcp (requiring `X-Api-Key:
fixture-key`, so that the client's configured headers are seen to arrive).

Tools: `echo` answers its text with the user the request's `_meta` names, `fail` ends in an error
result, `slow` sleeps before answering. When FIXTURE_PID_FILE is set, the process writes its pid
there, so that a test can kill it."""

import argparse
import json
import os
from typing import Any

import anyio
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY = "fixture-key"

TOOLS = [
    types.Tool(
        name="echo",
        description="Say the text back, with the user the call is for.",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    ),
    types.Tool(
        name="fail",
        description="Always fails.",
        input_schema={"type": "object", "properties": {}},
    ),
    types.Tool(
        name="slow",
        description="Wait, then say done.",
        input_schema={
            "type": "object",
            "properties": {"seconds": {"type": "number", "minimum": 0}},
            "required": ["seconds"],
        },
    ),
]


async def list_tools(
    ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS)


async def call_tool(
    ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    arguments = params.arguments or {}
    if params.name == "echo":
        user_id = (params.meta or {}).get("chatbot/user_id")
        text = json.dumps({"text": arguments["text"], "user_id": user_id})
    elif params.name == "fail":
        return types.CallToolResult(content=[types.TextContent(text="it broke")], is_error=True)
    elif params.name == "slow":
        await anyio.sleep(float(arguments["seconds"]))
        text = "done"
    else:
        return types.CallToolResult(
            content=[types.TextContent(text=f"no tool {params.name}")], is_error=True
        )
    return types.CallToolResult(content=[types.TextContent(text=text)])


SERVER = Server(
    "fixture",
    instructions="Fixture tools for the tests.",
    on_list_tools=list_tools,
    on_call_tool=call_tool,
)


def require_api_key(app: ASGIApp) -> ASGIApp:
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"x-api-key", API_KEY.encode()) not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return guarded


async def serve_stdio() -> None:
    async with stdio_server() as (read_stream, write_stream):
        await SERVER.run(read_stream, write_stream, SERVER.create_initialization_options())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT")
    options = parser.parse_args()
    if pid_file := os.environ.get("FIXTURE_PID_FILE"):
        with open(pid_file, "w") as file:
            file.write(str(os.getpid()))
    if options.http is None:
        anyio.run(serve_stdio)
        return
    import uvicorn

    app = require_api_key(SERVER.streamable_http_app())
    uvicorn.run(app, host="127.0.0.1", port=options.http, log_level="warning")


if __name__ == "__main__":
    main()
