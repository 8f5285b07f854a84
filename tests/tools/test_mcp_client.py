"""The tools of configured MCP servers, through the official SDK: listed under the toolset's name,
called for the user the service names (in the request's `_meta`), and unavailable, not fatal,
while their server is down, until it is back."""

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from chatbot.cli import configure_logging
from chatbot.config import McpServer, Settings
from chatbot.tools.base import Tool, ToolContext, ToolError, run_tool
from chatbot.tools.mcp_client import McpToolSource, result_value, start_sources
from tests.support import eventually, free_port, listening

FIXTURE = Path(__file__).resolve().with_name("mcp_fixture_server.py")


def _context(user_id: str) -> ToolContext:
    # MCP tools never touch the database: a sessionmaker bound to nothing will do.
    return ToolContext(user_id, async_sessionmaker())


def _stdio(pid_file: Path, **fields: Any) -> McpServer:
    return McpServer(
        command=sys.executable,
        args=[str(FIXTURE)],
        env={"FIXTURE_PID_FILE": str(pid_file)},
        **fields,
    )


@pytest.fixture
def pid_file(tmp_path: Path) -> Path:
    return tmp_path / "server.pid"


@pytest.fixture
async def source(pid_file: Path) -> AsyncIterator[McpToolSource]:
    started = McpToolSource("fixture", _stdio(pid_file))
    await started.start()
    # A loaded machine may take longer than the connect timeout to start a Python process.
    await eventually(lambda: len(started.toolset.tools) == 3, 30)
    yield started
    await started.aclose()


def _tool(source: McpToolSource, name: str) -> Tool:
    tool = source.toolset.get(name)
    assert tool is not None, [tool.name for tool in source.toolset.tools]
    return tool


def _pid(pid_file: Path) -> int:
    return int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- over stdio -------------------------------------------------------------------------------


async def test_a_servers_tools_are_listed_under_the_toolsets_name(source: McpToolSource) -> None:
    toolset = source.toolset
    assert toolset.name == "fixture"
    assert toolset.description == "Fixture tools for the tests."  # the server's instructions
    assert [tool.name for tool in toolset.tools] == [
        "fixture__echo",
        "fixture__fail",
        "fixture__slow",
    ]
    echo = _tool(source, "fixture__echo")
    assert echo.description == "Say the text back, with the user the call is for."
    assert echo.parameters["required"] == ["text"]
    assert echo.to_openai()["function"]["name"] == "fixture__echo"


async def test_the_configured_description_wins(pid_file: Path) -> None:
    source = McpToolSource("fixture", _stdio(pid_file, description="Echoes things"))
    assert source.toolset.description == "Echoes things"
    await source.start()
    try:
        assert source.toolset.description == "Echoes things"
        assert len(source.toolset.tools) == 3
    finally:
        await source.aclose()


async def test_a_call_names_its_user_in_the_request_meta(source: McpToolSource) -> None:
    echo = _tool(source, "fixture__echo")
    assert await echo.handler(_context("alice"), {"text": "hi"}) == {
        "text": "hi",
        "user_id": "alice",
    }
    # As the chat service runs it: the model's arguments are JSON, the user is the service's.
    result = await run_tool(
        echo,
        _context("bob"),
        '{"text": "hello"}',
        timeout_seconds=5,
        max_result_chars=1000,
    )
    assert result.status == "ok"
    assert json.loads(result.content) == {"text": "hello", "user_id": "bob"}


async def test_an_error_result_is_a_tool_error(source: McpToolSource) -> None:
    with pytest.raises(ToolError, match=r"^it broke$"):
        await _tool(source, "fixture__fail").handler(_context("alice"), {})
    result = await run_tool(
        _tool(source, "fixture__fail"),
        _context("alice"),
        "{}",
        timeout_seconds=5,
        max_result_chars=1000,
    )
    assert result.status == "error"
    assert json.loads(result.content) == {"error": "it broke"}


async def test_calls_from_many_tasks_run_at_once(source: McpToolSource) -> None:
    slow = _tool(source, "fixture__slow")
    echo = _tool(source, "fixture__echo")
    started = time.monotonic()
    slept, echoed = await asyncio.gather(
        asyncio.gather(*(slow.handler(_context("alice"), {"seconds": 2}) for _ in range(5))),
        asyncio.gather(*(echo.handler(_context(f"user{i}"), {"text": str(i)}) for i in range(10))),
    )
    # Wide of the mark on a loaded machine, far from the 10 s of one call after the other.
    assert time.monotonic() - started < 7
    assert slept == ["done"] * 5
    assert echoed == [{"text": str(i), "user_id": f"user{i}"} for i in range(10)]


async def test_a_call_cut_short_leaves_the_connection_usable(source: McpToolSource) -> None:
    result = await run_tool(
        _tool(source, "fixture__slow"),
        _context("alice"),
        '{"seconds": 10}',
        timeout_seconds=0.2,
        max_result_chars=1000,
    )
    assert result.status == "error"
    assert "longer than" in result.content
    echo = _tool(source, "fixture__echo")
    assert await echo.handler(_context("alice"), {"text": "still here"}) == {
        "text": "still here",
        "user_id": "alice",
    }


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
async def test_the_server_gets_a_safe_environment_plus_its_own(
    pid_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATBOT_SERVICE_SECRET", "not-for-the-server")
    source = McpToolSource("fixture", _stdio(pid_file))
    await source.start()
    try:
        names = _environment(_pid(pid_file))
    finally:
        await source.aclose()
    assert "FIXTURE_PID_FILE" in names
    assert "PATH" in names
    assert "CHATBOT_SERVICE_SECRET" not in names


def _environment(pid: int) -> set[str]:
    """The names of a process's environment variables."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return {entry.partition(b"=")[0].decode() for entry in environ if entry}


@pytest.mark.parametrize(
    "server",
    [
        McpServer(command=sys.executable, args=["-c", "pass"]),
        McpServer(command="/nonexistent/mcp-server", env={"API_KEY": "sk-secret-value"}),
    ],
    ids=["exits-at-once", "no-such-command"],
)
async def test_a_server_that_is_not_there_costs_only_its_tools(
    server: McpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = McpToolSource("broken", server, connect_timeout_seconds=30)
    started = time.monotonic()
    await source.start()
    try:
        assert time.monotonic() - started < 15  # it noticed, rather than waiting 30 s
        assert source.toolset.tools == ()
        assert source.toolset.name == "broken"
        assert any("MCP server broken is unavailable" in r.message for r in caplog.records)
        assert "sk-secret-value" not in caplog.text
    finally:
        await source.aclose()


async def test_a_server_that_never_answers_is_given_up_on_in_time() -> None:
    server = McpServer(command=sys.executable, args=["-c", "import time; time.sleep(60)"])
    source = McpToolSource("mute", server, connect_timeout_seconds=0.5)
    started = time.monotonic()
    await source.start()
    try:
        assert time.monotonic() - started < 10  # not the 60 s the server would take
        assert source.toolset.tools == ()
    finally:
        await source.aclose()


async def test_a_killed_server_is_unavailable_then_reconnected(
    source: McpToolSource, pid_file: Path
) -> None:
    echo = _tool(source, "fixture__echo")
    first = _pid(pid_file)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(ToolError, match="the tool server fixture is unavailable"):
        await echo.handler(_context("alice"), {"text": "anyone?"})
    await eventually(lambda: source.toolset.tools == (), 10)
    with pytest.raises(ToolError, match="the tool server fixture is unavailable"):
        await echo.handler(_context("alice"), {"text": "anyone?"})

    await eventually(lambda: len(source.toolset.tools) == 3, 10)
    assert _pid(pid_file) != first
    # Even the tool as listed before the loss works again: it calls the current connection.
    assert await echo.handler(_context("alice"), {"text": "back"}) == {
        "text": "back",
        "user_id": "alice",
    }


async def test_closing_ends_the_server_process(pid_file: Path) -> None:
    source = McpToolSource("fixture", _stdio(pid_file))
    await source.start()
    echo = _tool(source, "fixture__echo")
    pid = _pid(pid_file)
    assert _alive(pid)
    await source.aclose()
    assert not _alive(pid)
    assert source.toolset.tools == ()
    with pytest.raises(ToolError, match="unavailable"):
        await echo.handler(_context("alice"), {"text": "hi"})


async def test_a_servers_stderr_goes_to_the_debug_log(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="chatbot.tools.mcp_client")
    server = McpServer(
        command=sys.executable, args=["-c", "import sys; sys.stderr.write('it hurts\\n')"]
    )
    source = McpToolSource("noisy", server, connect_timeout_seconds=3)
    await source.start()
    try:
        await eventually(lambda: "MCP server noisy: it hurts" in caplog.messages, 5)
    finally:
        await source.aclose()
    assert "it hurts" not in capfd.readouterr().err


async def test_sources_start_together(
    pid_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = await start_sources(
        {
            "one": _stdio(pid_file),
            "two": _stdio(tmp_path / "two.pid"),
            "broken": McpServer(command=sys.executable, args=["-c", "pass"]),
        }
    )
    try:
        assert [source.name for source in sources] == ["one", "two", "broken"]
        assert [len(source.toolset.tools) for source in sources] == [3, 3, 0]
        assert sources[1].toolset.tools[0].name == "two__echo"
    finally:
        await asyncio.gather(*(source.aclose() for source in sources))

    async def slow_start(self: McpToolSource) -> None:
        await asyncio.sleep(2)

    monkeypatch.setattr(McpToolSource, "start", slow_start)
    started = time.monotonic()
    await start_sources({name: _stdio(pid_file) for name in ("a", "b", "c", "d")})
    assert time.monotonic() - started < 5  # not 8 s, one after the other


# --- over streamable HTTP ---------------------------------------------------------------------


async def _http_server(port: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(FIXTURE), "--http", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await eventually(lambda: listening(port), 30)
    return process


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


@pytest.fixture
async def http_url() -> AsyncIterator[str]:
    port = free_port()
    process = await _http_server(port)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await _stop(process)


async def test_an_http_server_that_restarts_is_reconnected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp?api_key=secret-in-the-url"
    process = await _http_server(port)
    source = McpToolSource("remote", McpServer(url=url, headers={"X-Api-Key": "fixture-key"}))
    try:
        await source.start()
        echo = _tool(source, "remote__echo")
        assert await echo.handler(_context("carol"), {"text": "one"}) == {
            "text": "one",
            "user_id": "carol",
        }
        # The server restarts: the session the service holds is unknown to the new process.
        await _stop(process)
        process = await _http_server(port)

        async def answers_again() -> bool:
            try:
                answer = await echo.handler(_context("carol"), {"text": "two"})
                return bool(answer == {"text": "two", "user_id": "carol"})
            except ToolError:
                return False

        await eventually(answers_again, 30)
    finally:
        await source.aclose()
        await _stop(process)
    # Our own log never names the configuration; the HTTP client's is quieted by `chatbot serve`.
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("chatbot")]
    assert ours
    assert not [message for message in ours if "secret-in-the-url" in message]


def test_serve_keeps_http_clients_from_logging_each_url() -> None:
    configure_logging(Settings(_env_file=None, log_level="DEBUG"))
    for name in ("httpx2", "httpx", "mcp.client.streamable_http"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)


async def test_over_streamable_http_with_the_configured_headers(http_url: str) -> None:
    source = McpToolSource("remote", McpServer(url=http_url, headers={"X-Api-Key": "fixture-key"}))
    await source.start()
    try:
        assert [tool.name for tool in source.toolset.tools] == [
            "remote__echo",
            "remote__fail",
            "remote__slow",
        ]
        echo = _tool(source, "remote__echo")
        assert await echo.handler(_context("carol"), {"text": "over http"}) == {
            "text": "over http",
            "user_id": "carol",
        }
        with pytest.raises(ToolError, match="it broke"):
            await _tool(source, "remote__fail").handler(_context("carol"), {})
        slow = _tool(source, "remote__slow")
        started = time.monotonic()
        done = await asyncio.gather(
            *(slow.handler(_context("carol"), {"seconds": 2}) for _ in range(4))
        )
        assert done == ["done"] * 4
        assert time.monotonic() - started < 6  # not 8 s, one after the other
    finally:
        await source.aclose()


async def test_over_http_a_refused_key_leaves_the_toolset_empty(
    http_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="chatbot")
    source = McpToolSource(
        "remote", McpServer(url=http_url, headers={"X-Api-Key": "wrong-key-value"})
    )
    await source.start()
    try:
        assert source.toolset.tools == ()
        assert "MCP server remote is unavailable" in caplog.text
        assert "wrong-key-value" not in caplog.text
    finally:
        await source.aclose()


# --- what the model is offered and given ------------------------------------------------------


def test_tools_the_model_could_not_be_offered_are_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = McpToolSource("odd", McpServer(command="unused"))
    schema = {"type": "object", "properties": {}}
    tools = source._tools(
        [
            types.Tool(name="fine", input_schema=schema, description="Fine."),
            types.Tool(name="not.a name!", input_schema=schema, title="Odd name"),
            types.Tool(name="broken", input_schema={"type": "object", "properties": 3}),
            types.Tool(name="not_a_name_", input_schema=schema),
            types.Tool(name="x" * 80, input_schema=schema),
        ]
    )
    assert [(tool.name, tool.description) for tool in tools] == [
        ("odd__fine", "Fine."),
        ("odd__not_a_name_", "Odd name"),
        ("odd__" + "x" * 59, "x" * 80),
    ]
    assert "tool 'broken' has an invalid input schema" in caplog.text
    assert "tool 'not_a_name_' clashes with another" in caplog.text


def test_a_result_becomes_what_the_model_reads() -> None:
    def text(*texts: str) -> list[types.ContentBlock]:
        return [types.TextContent(text=value) for value in texts]

    assert result_value(types.CallToolResult(content=text('{"a": 1}'))) == {"a": 1}
    assert result_value(types.CallToolResult(content=text("plain words"))) == "plain words"
    assert result_value(types.CallToolResult(content=text("one", "two"))) == "one\ntwo"
    assert result_value(types.CallToolResult(content=[])) == ""
    structured = types.CallToolResult(content=text("ignored"), structured_content={"b": [2]})
    assert result_value(structured) == {"b": [2]}
    image = types.ImageContent(data="aGk=", mime_type="image/png")
    assert result_value(types.CallToolResult(content=[*text("see"), image])) == [
        "see",
        {"type": "image", "mimeType": "image/png"},
    ]
    embedded = types.EmbeddedResource(
        resource=types.TextResourceContents(uri="file:///notes.txt", text="notes")
    )
    assert result_value(types.CallToolResult(content=[embedded])) == [
        {"type": "resource", "uri": "file:///notes.txt", "text": "notes"}
    ]


def test_an_error_result_is_read_bounded() -> None:
    with pytest.raises(ToolError) as raised:
        result_value(
            types.CallToolResult(content=[types.TextContent(text="x" * 10_000)], is_error=True)
        )
    assert len(str(raised.value)) <= 2000
    with pytest.raises(ToolError, match=r"^the tool failed$"):
        result_value(types.CallToolResult(content=[], is_error=True))
