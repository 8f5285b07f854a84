"""The client side of a benchmark: a lean HTTP/1.1 connection, SSE parsing, JWT user tokens,
and the event loop the client runs on.

The client shares the machine's cores with what it measures, so it is kept lean: httpx's
pure-Python HTTP parsing of 500 event streams cost the load generator as much CPU as the service
spent serving them, and starved it. Preparations (creating conversations) may use httpx.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import jwt

T = TypeVar("T")


class TurnError(Exception):
    """A request the server answered wrongly: a status other than 200, a broken stream."""


class RawStream:
    """One keep-alive HTTP/1.1 connection that POSTs (or GETs) and reads a body as it arrives
    (chunked, as streams come, or of a Content-Length)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._chunked, self._length = False, 0

    async def open(self) -> None:
        """Connect before a clock starts: the first time, or again after the server closed the
        connection for being idle (uvicorn does after 5 s, between phases)."""
        if self._reader is not None and self._reader.at_eof():
            self.close()
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        """Send the request, read the status and the headers; the body is left to `body()`."""
        return await self._send(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n",
            body,
            headers,
        )

    async def post_whole(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """`post`, then the whole body; the connection is dropped on any failure (whatever
        state it was left in, the next request starts afresh)."""
        try:
            status = await self.post(path, body, headers)
            return status, b"".join([chunk async for chunk in self.body()])
        except BaseException:
            self.close()
            raise

    async def get(self, path: str, headers: dict[str, str]) -> int:
        """A GET (following a reply's stream), read like a POST's answer."""
        return await self._send(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n", b"", headers)

    async def _send(self, head: str, body: bytes, headers: dict[str, str]) -> int:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._writer.write(f"{head}{lines}\r\n".encode() + body)
        status = int((await self._reader.readline()).split()[1])
        self._chunked, self._length = False, 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "transfer-encoding" and "chunked" in value.lower():
                self._chunked = True
            elif name.lower() == "content-length":
                self._length = int(value)
        return status

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives: each HTTP chunk as it was sent, or the whole body."""
        assert self._reader is not None
        if not self._chunked:
            yield await self._reader.readexactly(self._length)
            return
        while size := int((await self._reader.readline()).split(b";")[0], 16):
            yield await self._reader.readexactly(size)
            await self._reader.readexactly(2)
        await self._reader.readline()  # the blank line after the last chunk

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def sse_events(buffer: bytearray) -> list[tuple[str, str]]:
    """Take the complete events off the front of `buffer`: (event name, data) pairs; what is
    left is the start of an event still arriving."""
    normalized = bytes(buffer).replace(b"\r\n", b"\n")
    *complete, rest = normalized.split(b"\n\n")
    buffer[:] = rest
    events = []
    for block in complete:
        name, data = "message", []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


def user_token(secret: str, subject: str, lifetime_s: float = 3 * 3600) -> str:
    """A JWT for the user `subject`, as the service started with `secret` accepts it."""
    now = int(time.time())
    return jwt.encode(
        {"sub": subject, "iat": now, "exp": now + lifetime_s}, secret, algorithm="HS256"
    )


def run_client_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the client on uvloop where there is one: the service's own event loop, and a lean
    client."""
    try:
        from uvloop import run
    except ImportError:
        from asyncio import run
    return run(main)
