"""The tools of MCP servers named in the settings, as toolsets a conversation may use.

Each server is one connection held for the life of the service by a task of its own: the SDK's
transports and sessions are anyio task groups, which must be entered and left in one task, so
that task holds them open while tool calls, from whichever task runs them, go through its
session. A server that is down or goes away costs only its own tools: they fail with an error the
model can read while the owning task connects again in the background.

The user a call is for reaches the server in the request's `_meta`, under `chatbot/user_id`: that
is how a server of someone else's learns who the user is, and the model never supplies it."""

import asyncio
import json
import logging
import os
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, BinaryIO, Protocol, Self, TextIO, cast

import anyio
import httpx2
import mcp_types as types
from jsonschema.exceptions import SchemaError
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp.client import Transport
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from chatbot import __version__
from chatbot.config import McpServer
from chatbot.tools.base import Handler, Tool, ToolContext, ToolError, Toolset

logger = logging.getLogger(__name__)

USER_META_KEY = "chatbot/user_id"
"""The request `_meta` key that names the user a call is for."""

_CLIENT_INFO = types.Implementation(name="chatbot", version=__version__)
_FIRST_RETRY_SECONDS = 1.0
_MAX_RETRY_SECONDS = 30.0
_MAX_TOOL_PAGES = 50
"""A server that keeps handing out cursors must not keep the listing going for ever."""
_MAX_ERROR_CHARS = 2000
_MAX_DESCRIPTION_CHARS = 1000
_MAX_STDERR_LINE_CHARS = 1000
_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's defaults for a client of its own making: a server's event stream may stay quiet
for minutes (a call's own time limit is the service's, not this)."""
_PING_SECONDS = 5.0
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True, slots=True)
class _Connection:
    session: ClientSession
    lost: anyio.Event


class McpToolSource:
    """One configured MCP server, connected for the life of the service."""

    def __init__(
        self, name: str, server: McpServer, *, connect_timeout_seconds: float = 10.0
    ) -> None:
        self.name = name
        self._server = server
        self._connect_timeout = connect_timeout_seconds
        self._unavailable = f"the tool server {name} is unavailable"
        self._toolset = self._no_tools()
        self._connection: _Connection | None = None
        self._connected_at: float | None = None
        """When the connection being held was made."""
        self._first_attempt = asyncio.Event()
        self._stop: anyio.CancelScope | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def toolset(self) -> Toolset:
        """The server's tools as last listed: none while it is not connected."""
        return self._toolset

    async def start(self) -> None:
        """Connect, waiting at most the connect timeout; a server that is not there yet is
        tried again in the background, so that one server never holds the service up."""
        if self._task is None:
            self._stop = anyio.CancelScope()
            self._task = asyncio.create_task(self._run(self._stop), name=f"mcp:{self.name}")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._first_attempt.wait()
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        """Disconnect and stop trying: the session closes, a subprocess is ended."""
        if self._task is None or self._stop is None:
            return
        self._stop.cancel()
        # Shielded: a cancelled shutdown must not cut the SDK's own bounded teardown short.
        await asyncio.shield(self._task)

    async def _run(self, stop: anyio.CancelScope) -> None:
        """Hold a connection, and make a new one whenever it fails, backing off while the server
        stays away (and while it keeps failing soon after connecting). Only the first failure in
        a row is a warning: a server that is down for an hour must not fill the log."""
        delay = _FIRST_RETRY_SECONDS
        reported = False
        with stop:
            while True:
                self._connected_at = None
                try:
                    await self._serve()
                except Exception as exc:
                    if stop.cancel_called:  # closing, which may end a connect in any error
                        return
                    reason = _reason(exc)
                else:
                    reason = "the server closed the connection"
                self._first_attempt.set()
                if self._connected_at is not None:
                    logger.warning(
                        "lost the connection to MCP server %s (%s); reconnecting in the background",
                        self.name,
                        reason,
                    )
                    if time.monotonic() - self._connected_at >= _MAX_RETRY_SECONDS:
                        delay = _FIRST_RETRY_SECONDS
                else:
                    (logger.debug if reported else logger.warning)(
                        "MCP server %s is unavailable (%s); trying again in the background",
                        self.name,
                        reason,
                    )
                reported = True
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_SECONDS)

    async def _serve(self) -> None:
        """Connect and list the tools, then hold the connection until it is lost."""
        lost = anyio.Event()
        async with AsyncExitStack() as stack:
            read_stream, write_stream = await stack.enter_async_context(
                await self._transport(stack)
            )
            session = await stack.enter_async_context(
                ClientSession(_Watched(read_stream, lost), write_stream, client_info=_CLIENT_INFO)
            )
            with anyio.fail_after(self._connect_timeout):
                initialized = await session.initialize()
                listed = await _list_tools(session)
            self._toolset = Toolset(
                self.name,
                _cut(
                    self._server.description
                    or initialized.instructions
                    or f"The tools of the MCP server {initialized.server_info.name}",
                    _MAX_DESCRIPTION_CHARS,
                ),
                self._tools(listed),
            )
            self._connection = _Connection(session, lost)
            self._connected_at = time.monotonic()
            self._first_attempt.set()
            logger.info("MCP server %s: %d tools", self.name, len(self._toolset.tools))
            try:
                await lost.wait()
            finally:
                self._connection = None
                self._toolset = self._no_tools()

    async def _transport(self, stack: AsyncExitStack) -> Transport:
        """The transport to enter, with what it needs set up on `stack`."""
        server = self._server
        if server.url is not None:
            client = await stack.enter_async_context(
                httpx2.AsyncClient(headers=server.headers, timeout=_HTTP_TIMEOUT)
            )
            return streamable_http_client(server.url, http_client=client)
        assert server.command is not None  # a server has a url or a command
        reader, errlog = _pipe()
        stack.enter_context(reader)
        stack.enter_context(errlog)
        stderr, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: _StderrLines(self.name), reader
        )
        stack.callback(stderr.close)
        # `env` is added to the SDK's short list of safe variables, not to the service's own.
        parameters = StdioServerParameters(command=server.command, args=server.args, env=server.env)
        return stdio_client(parameters, errlog=errlog)

    def _no_tools(self) -> Toolset:
        return Toolset(
            self.name, self._server.description or f"The tools of the MCP server {self.name}", ()
        )

    def _tools(self, listed: list[types.Tool]) -> tuple[Tool, ...]:
        """The server's tools under names of this toolset's own; one the model could not be
        offered (a schema that is not one, a name that clashes once made valid) is left out."""
        tools: dict[str, Tool] = {}
        for spec in listed:
            name = _INVALID_NAME_CHARS.sub("_", f"{self.name}__{spec.name}")[:64]
            if name in tools:
                logger.warning("MCP server %s: tool %r clashes with another", self.name, spec.name)
                continue
            try:
                tools[name] = Tool(
                    name,
                    spec.description or spec.title or spec.name,
                    spec.input_schema,
                    self._handler(spec.name),
                )
            except SchemaError as exc:
                logger.warning(
                    "MCP server %s: tool %r has an invalid input schema (%s)",
                    self.name,
                    spec.name,
                    exc.message,
                )
        return tuple(tools.values())

    def _handler(self, tool_name: str) -> Handler:
        async def handler(context: ToolContext, arguments: dict[str, Any]) -> Any:
            return await self._call(tool_name, context, arguments)

        return handler

    async def _call(self, tool_name: str, context: ToolContext, arguments: dict[str, Any]) -> Any:
        connection = self._connection
        if connection is None:
            raise ToolError(self._unavailable)
        try:
            result = await connection.session.call_tool(
                tool_name, arguments, meta=_meta(context.user_id)
            )
        except MCPError as exc:
            # Over HTTP a server that restarted answers "session not found" while the stream
            # stays open, and one request's stream may end alone: ask whether the session
            # still answers before giving it up (and every call in flight with it).
            if not await _answers(connection.session):
                connection.lost.set()
                raise ToolError(self._unavailable) from None
            raise ToolError(
                _cut(
                    f"the tool server {self.name} refused the call: {exc.message}", _MAX_ERROR_CHARS
                )
            ) from None
        return result_value(result)


async def _answers(session: ClientSession) -> bool:
    try:
        with anyio.fail_after(_PING_SECONDS):
            await session.send_ping()
    except Exception:
        return False
    return True


async def start_sources(servers: dict[str, McpServer]) -> list[McpToolSource]:
    """A source for each server, all connecting at once: startup waits for the slowest only."""
    sources = [McpToolSource(name, server) for name, server in servers.items()]
    await asyncio.gather(*(source.start() for source in sources))
    return sources


def result_value(result: types.CallToolResult) -> Any:
    """A call's result as the model reads it: the structured content when the server gives
    one, else the text (parsed when it is one JSON document), with anything that is not text
    named rather than inlined. An error result becomes a ToolError carrying its text."""
    if result.is_error:
        text = "\n".join(
            block.text for block in result.content if isinstance(block, types.TextContent)
        )
        raise ToolError(_cut(text or "the tool failed", _MAX_ERROR_CHARS))
    if result.structured_content is not None:
        return result.structured_content
    parts = [_part(block) for block in result.content]
    texts = [part for part in parts if isinstance(part, str)]
    if len(texts) < len(parts):
        return parts
    if len(texts) == 1:
        try:
            return json.loads(texts[0])
        except ValueError:
            return texts[0]
    return "\n".join(texts)


def _part(block: types.ContentBlock) -> str | dict[str, Any]:
    match block:
        case types.TextContent():
            return block.text
        case types.ImageContent() | types.AudioContent():
            return {"type": block.type, "mimeType": block.mime_type}
        case types.ResourceLink():
            return {"type": block.type, "uri": str(block.uri), "mimeType": block.mime_type}
        case types.EmbeddedResource(resource=types.TextResourceContents() as resource):
            return {"type": block.type, "uri": str(resource.uri), "text": resource.text}
        case types.EmbeddedResource(resource=resource):
            return {"type": block.type, "uri": str(resource.uri), "mimeType": resource.mime_type}


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    listed = await session.list_tools()
    tools = list(listed.tools)
    for _ in range(_MAX_TOOL_PAGES):
        if listed.next_cursor is None:
            break
        listed = await session.list_tools(
            params=types.PaginatedRequestParams(cursor=listed.next_cursor)
        )
        tools += listed.tools
    return tools


class _Incoming(Protocol):
    async def receive(self) -> SessionMessage | Exception: ...
    async def aclose(self) -> None: ...


class _Watched:
    """A transport's read stream that says when it ends: the SDK's session fails the calls in
    flight when its server goes away, but tells nobody else."""

    def __init__(self, stream: _Incoming, ended: anyio.Event) -> None:
        self._stream = stream
        self._ended = ended

    @property
    def last_context(self) -> object:
        """What the SDK reads from streams that carry the sender's context variables."""
        return getattr(self._stream, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._ended.set()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _StderrLines(asyncio.Protocol):
    """A stdio server's stderr, line by line, into the debug log: it must not write over the
    service's own output, yet whoever debugs a server wants to read it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _MAX_STDERR_LINE_CHARS:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._log(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._partial:
            self._log(self._partial)

    def _log(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()[:_MAX_STDERR_LINE_CHARS]
        logger.debug("MCP server %s: %s", self._name, text)


def _meta(user_id: str) -> types.RequestParamsMeta:
    # An open map in the SDK (`extra_items`), which mypy does not know of yet.
    return cast(types.RequestParamsMeta, {USER_META_KEY: user_id})


def _pipe() -> tuple[BinaryIO, TextIO]:
    read_end, write_end = os.pipe()
    return open(read_end, "rb", buffering=0), open(write_end, "w")


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a line: the innermost error, never the configuration (its
    headers and environment may hold secrets)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, MCPError) and exc.code == types.CONNECTION_CLOSED:
        return "the server closed the connection"
    return _cut(f"{type(exc).__name__}: {exc}", 300)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
