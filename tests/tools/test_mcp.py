"""`chatbot mcp`: the task tools for other MCP clients, over stdio, through the official SDK."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import jwt
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from chatbot.auth.tokens import issue_token
from chatbot.config import Settings
from tests.support import JWT_SECRET, ROOT, eventually, free_port, listening


def _token(user_id: str) -> str:
    return issue_token(Settings(_env_file=None, jwt_secret=JWT_SECRET), user_id)


@asynccontextmanager
async def _session(database_url: str, **env: str) -> AsyncIterator[ClientSession]:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "chatbot", "mcp"],
        env={"DATABASE_URL": database_url, "CHATBOT_AUTO_MIGRATE": "true", **env},
        cwd=ROOT,
    )
    async with (
        stdio_client(server) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, read_timeout_seconds=30) as session,
    ):
        await session.initialize()
        yield session


def _payload(result: Any) -> tuple[bool, Any]:
    assert isinstance(result, types.CallToolResult)
    [content] = result.content
    assert isinstance(content, types.TextContent)
    return bool(result.is_error), json.loads(content.text)


async def test_an_mcp_client_lists_and_calls_the_task_tools(database_url: str) -> None:
    env = {"CHATBOT_JWT_SECRET": JWT_SECRET}
    async with _session(database_url, **env, CHATBOT_MCP_TOKEN=_token("alice")) as alice:
        listed = await alice.list_tools()
        names = [tool.name for tool in listed.tools]
        assert names == ["add_task", "list_tasks", "complete_task", "update_task", "delete_task"]
        add = next(tool for tool in listed.tools if tool.name == "add_task")
        assert add.input_schema["required"] == ["title"]

        failed, task = _payload(await alice.call_tool("add_task", {"title": "buy milk"}))
        assert not failed
        assert task["title"] == "buy milk"
        failed, done = _payload(await alice.call_tool("complete_task", {"task_id": task["id"]}))
        assert not failed
        assert done["done"] is True
        # A user named in the arguments is refused, not obeyed.
        failed, error = _payload(
            await alice.call_tool("add_task", {"title": "planted", "user_id": "bob"})
        )
        assert failed
        assert "user_id" in error["error"]

    async with _session(database_url, **env, CHATBOT_MCP_TOKEN=_token("bob")) as bob:
        failed, mine = _payload(await bob.call_tool("list_tasks", {}))
        assert not failed
        assert mine["tasks"] == []
        failed, error = _payload(await bob.call_tool("delete_task", {"task_id": task["id"]}))
        assert failed
        assert "no task with this id" in error["error"]

    async with _session(database_url, **env, CHATBOT_MCP_TOKEN=_token("alice")) as alice:
        failed, hers = _payload(await alice.call_tool("list_tasks", {}))
        assert [(t["title"], t["done"]) for t in hers["tasks"]] == [("buy milk", True)]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "CHATBOT_MCP_TOKEN is not set"),
        ("not-a-jwt", "CHATBOT_MCP_TOKEN is not a valid token"),
        (
            issue_token(Settings(_env_file=None, jwt_secret="x" * 40), "eve"),
            "CHATBOT_MCP_TOKEN is not a valid token",
        ),
    ],
    ids=["missing", "garbage", "signed-by-another-key"],
)
def test_mcp_over_stdio_refuses_to_start_without_a_valid_token(
    tmp_path: Path, token: str | None, expected: str
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/mcp.db",
        "CHATBOT_JWT_SECRET": JWT_SECRET,
    }
    if token is not None:
        env["CHATBOT_MCP_TOKEN"] = token
    started = subprocess.run(
        [sys.executable, "-m", "chatbot", "mcp"],
        env=env,
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode != 0
    assert expected in started.stderr
    assert started.stdout == ""  # nothing that a client could take for the protocol


@asynccontextmanager
async def _http_server(database_url: str) -> AsyncIterator[str]:
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": database_url,
        "CHATBOT_AUTO_MIGRATE": "true",
        "CHATBOT_JWT_SECRET": JWT_SECRET,
        "CHATBOT_MCP_PORT": str(port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot", "mcp", "--http",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        await eventually(lambda: listening(port), 30)
        yield url
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


@asynccontextmanager
async def _http_session(url: str, token: str) -> AsyncIterator[ClientSession]:
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with (
        client,
        streamable_http_client(url, http_client=client) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream, read_timeout_seconds=30) as session,
    ):
        await session.initialize()
        yield session


async def test_over_streamable_http_each_request_acts_for_its_bearer(database_url: str) -> None:
    async with _http_server(database_url) as url:
        async with httpx2.AsyncClient() as anonymous:
            refused = await anonymous.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert refused.status_code == 401
        async with _http_session(url, _token("alice")) as alice:
            names = [tool.name for tool in (await alice.list_tools()).tools]
            assert "add_task" in names
            failed, task = _payload(await alice.call_tool("add_task", {"title": "call mum"}))
            assert not failed
        async with _http_session(url, _token("bob")) as bob:
            failed, listed = _payload(await bob.call_tool("list_tasks", {}))
            assert not failed
            assert listed["tasks"] == []
            failed, _ = _payload(await bob.call_tool("complete_task", {"task_id": task["id"]}))
            assert failed
        async with _http_session(url, _token("alice")) as alice:
            failed, listed = _payload(await alice.call_tool("list_tasks", {}))
            assert [(t["title"], t["done"]) for t in listed["tasks"]] == [("call mum", False)]


async def test_an_expired_token_stops_a_running_stdio_server_from_acting(
    database_url: str,
) -> None:
    settings = Settings(_env_file=None, jwt_secret=JWT_SECRET)
    # Long enough for the server to start on a busy machine; then waited out.
    token = issue_token(settings, "alice", ttl_seconds=15)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    env = {"CHATBOT_JWT_SECRET": JWT_SECRET, "CHATBOT_JWT_LEEWAY_SECONDS": "0"}
    async with _session(database_url, **env, CHATBOT_MCP_TOKEN=token) as alice:
        failed, _ = _payload(await alice.call_tool("list_tasks", {}))
        assert not failed
        await asyncio.sleep(max(0.0, expires_at + 1 - time.time()))
        failed, error = _payload(await alice.call_tool("add_task", {"title": "too late"}))
        assert failed
        assert "credentials" in error["error"]
