"""What `chatbot serve` adds to uvicorn against connections that never finish a request: a
deadline for each request head, a bound on its size, a cap on open connections, and a file
limit to match. Measured against hypercorn and granian, which each lack one of these (hypercorn
has no connection cap; granian's header timeout leaves connections that send nothing open)
while uvicorn is as fast as either: see the README, Behind a proxy."""

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)


MAX_HEAD_BYTES = 65_536
"""A request head (request line and headers) larger than about this is answered 431 and its
connection closed: httptools, unlike h11, sets no bound of its own, so one connection could
otherwise grow the process by hundreds of megabytes in a second. Counted per read, so a head
may pass it by up to one read (256 KiB)."""

MAX_PIPELINED = 8
"""Requests a connection may have queued behind the one being answered; past that it is
dropped. Each queued head is a request object in memory, and a client that writes thousands
without reading would otherwise hold them all."""

_CAP_WARNING_SECONDS = 10.0


class ConnectionGuard:
    """The open connections of one server process (each worker has its own, unpickled from
    the server's configuration): how long one may take to send a request head, how many may
    be open, and those waiting for a head now, longest first."""

    def __init__(self, *, header_timeout: float, max_connections: int, send_timeout: float) -> None:
        self.header_timeout = header_timeout
        """Also the longest pause in a request body (as nginx's client_body_timeout)."""
        self.max_connections = max_connections
        self.send_timeout = send_timeout
        """The longest a client may leave a response unread (as nginx's send_timeout)."""
        self.waiting: dict[GuardedHttpProtocol, None] = {}
        self._warned_at = -_CAP_WARNING_SECONDS

    def make_room(self) -> bool:
        """At the cap: close the connection that has waited longest for a request head (it
        holds a descriptor and serves nobody); False when every one is serving a request."""
        victim = next(iter(self.waiting), None)
        now = time.monotonic()
        if now - self._warned_at >= _CAP_WARNING_SECONDS:
            self._warned_at = now
            logger.warning(
                "%d connections open (CHATBOT_MAX_CONNECTIONS): %s",
                self.max_connections,
                "closing those that have sent no complete request"
                if victim is not None
                else "refusing new ones, every one is serving a request",
            )
        if victim is None:
            return False
        victim.drop()
        return True


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with what it lacks against connections that never
    finish a request: a deadline for each request head, counted from the connection's opening
    or from its previous response's end (a running response, an SSE stream say, is never
    timed); a bound on the head's size; and the cap on open connections. Idle keep-alive
    connections are closed by uvicorn's own `timeout_keep_alive` as before."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None
        """Bytes read of the request head being parsed; None between heads."""
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.max_connections and not self.guard.make_room():
            # Closed at once, so the cap keeps descriptors free for the process's own use.
            self._refused = True
            transport.abort()
            return
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._stop_awaiting_head()
        self._body_timer = _cancelled(self._body_timer)
        self._write_timer = _cancelled(self._write_timer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._head_bytes is not None
            and self._head_bytes > MAX_HEAD_BYTES
            and not self.transport.is_closing()
        ):
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"content-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()
            else:  # a pipelined head during a response: no status line can go out now
                self.transport.abort()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._stop_awaiting_head()
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:
            self.transport.abort()
            # Raised into the parser, which stops reading this buffer's other heads.
            raise ConnectionAbortedError("too many pipelined requests")
        # Until its body has come: a body that stops coming holds a place under the cap.
        self._body_timer = self._dropped_after(self._body_timer, self.guard.header_timeout)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._body_timer = self._dropped_after(self._body_timer, self.guard.header_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_timer = _cancelled(self._body_timer)

    def pause_writing(self) -> None:
        super().pause_writing()
        # The client stopped reading: uvicorn's send waits for it with no bound.
        self._write_timer = self._dropped_after(self._write_timer, self.guard.send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_timer = _cancelled(self._write_timer)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless a pipelined request, its head already read, is what runs now.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_head()

    def drop(self) -> None:
        self._stop_awaiting_head()
        self.transport.abort()

    def _await_head(self) -> None:
        self._stop_awaiting_head()
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timed_out)
        self.guard.waiting[self] = None

    def _stop_awaiting_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.guard.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.guard.waiting.pop(self, None)
        self.transport.abort()  # not close(): that would wait for unsent data to drain

    def _dropped_after(
        self, timer: asyncio.TimerHandle | None, seconds: float
    ) -> asyncio.TimerHandle:
        """A (new) deadline, after which the connection is dropped."""
        _cancelled(timer)
        return self.loop.call_later(seconds, self.transport.abort)


def _cancelled(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """No timer any more: what to keep in its place."""
    if timer is not None:
        timer.cancel()
    return None


def raise_file_limit(max_connections: int) -> None:
    """Each connection takes a file descriptor, and a running reply a second one to the model
    provider: raise the soft limit that far if the hard limit allows (as Go's runtime raises
    it), else say that the cap cannot be reached."""
    needed = 2 * max_connections + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "the file limit (%d) is below the %d that CHATBOT_MAX_CONNECTIONS=%d may need: "
            "raise it (ulimit -n, LimitNOFILE=, --ulimit nofile=) or lower the cap",
            soft,
            needed,
            max_connections,
        )
