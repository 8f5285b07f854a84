"""Connection hygiene of `chatbot serve`, over real sockets against the real process: connections
that never finish a request head are closed after CHATBOT_HEADER_TIMEOUT_SECONDS, and past
CHATBOT_MAX_CONNECTIONS the process makes room or refuses, so that it never runs out of file
descriptors and /healthz keeps answering."""

import asyncio
import os
import resource
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import eventually, free_port

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")

FILE_LIMIT = 1024
"""The child's RLIMIT_NOFILE, soft and hard: the limit of the reported outage."""
LIMITED = (
    "import os, resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FILE_LIMIT}, {FILE_LIMIT})); "
    "os.execv(sys.executable, [sys.executable, '-m', 'chatbot', *sys.argv[1:]])"
)
"""Sets the limit in the child, then becomes `python -m chatbot ...` (same pid): no preexec_fn,
which forks a threaded test process."""
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
REQUEST = PARTIAL_HEAD + b"\r\n"


@dataclass
class _Server:
    port: int
    pid: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open_descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@asynccontextmanager
async def _serve(
    tmp_path: Path, *args: str, file_limit: bool = False, **env: str
) -> AsyncIterator[_Server]:
    """`chatbot serve ARGS` on a free port with the offline demo model, answering /healthz,
    interrupted on leaving; its output goes to a file (read it once stopped)."""
    port = free_port()
    environment = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"sqlite:///{tmp_path}/connections.db",
        "CHATBOT_PORT": str(port),
        "CHATBOT_RATE_LIMIT": "",
        "CHATBOT_MAX_CONCURRENT_REPLIES": "100",
        **env,
    }
    command = ["-c", LIMITED, "serve"] if file_limit else ["-m", "chatbot", "serve"]
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, *args, env=environment, stdout=output, stderr=output
        )
    server = _Server(port, process.pid, log)
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            await eventually(lambda: _answers(client), 30)
        yield server
    finally:
        process.send_signal(2)
        await asyncio.wait_for(process.wait(), 30)


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _healthz_within(server: _Server, seconds: float) -> None:
    """/healthz on a connection of its own answers 200 within `seconds`."""
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        response = await asyncio.wait_for(client.get("/healthz"), seconds)
    assert response.status_code == 200


@contextmanager
def _descriptors_for_the_client(count: int) -> Any:
    """Room in this process for `count` sockets more, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"the test needs a file limit of {wanted}, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Open:
    """A connection the test holds, and when the server closed it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, since: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.since = since
        """Loop time before the server could start timing it (before connecting, or before
        the request whose response starts its clock)."""
        self.closed_after: float | None = None
        self._watch = asyncio.create_task(self._until_closed())

    async def _until_closed(self) -> None:
        with suppress(ConnectionError):
            while await self.reader.read(65536):
                pass  # a response to a complete request; the close is what is awaited
        self.closed_after = asyncio.get_running_loop().time() - self.since

    async def close(self) -> None:
        self._watch.cancel()
        self.writer.close()
        with suppress(Exception):
            await self.writer.wait_closed()


@asynccontextmanager
async def _holding() -> AsyncIterator[list[_Open]]:
    """A list for the connections the test opens, all closed on leaving, however it leaves."""
    held: list[_Open] = []
    try:
        yield held
    finally:
        for one in held:
            await one.close()


async def _connect(port: int, first: bytes = b"", *, then: bytes = b"") -> _Open:
    """A connection that sends `first` (and reads its response when `then` follows), then
    `then`, and holds on."""
    since = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
    if then:
        await reader.readuntil(b'{"status":"ok"}')
        writer.write(then)
    return _Open(reader, writer, since)


async def test_connections_without_a_complete_request_head_are_closed_after_the_timeout(
    tmp_path: Path,
) -> None:
    timeout = 1.0
    async with (
        _serve(
            tmp_path,
            "--workers", "2",
            CHATBOT_HEADER_TIMEOUT_SECONDS=str(timeout),
            CHATBOT_DEMO_DELAY_MS="60",
        ) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
        _holding() as held,
    ):  # fmt: skip
        started = asyncio.get_running_loop().time()
        # A reply streamed for several timeouts: the clock stops at a request's head.
        stream = asyncio.create_task(
            client.post(
                "/v1/chat",
                json={"message": "hello there, tell me something"},
                headers={"Accept": "text/event-stream"},
            )
        )
        held += [await _connect(server.port) for _ in range(20)]  # nothing sent
        held += [await _connect(server.port, PARTIAL_HEAD) for _ in range(20)]
        # A keep-alive connection whose next request never completes.
        held += [await _connect(server.port, REQUEST, then=PARTIAL_HEAD) for _ in range(20)]
        # A head sent slowly, but whole within the timeout, is served.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: localhost\r\n", b"\r\n"):
            await asyncio.sleep(timeout / 10)
            writer.write(piece)
        assert b" 200 OK" in await reader.readuntil(b'{"status":"ok"}')
        writer.close()

        await eventually(lambda: all(one.closed_after is not None for one in held), 15)
        closed_after = [one.closed_after for one in held if one.closed_after is not None]
        assert min(closed_after) >= timeout - 0.05, closed_after  # never before the timeout
        await _healthz_within(server, 1)

        response = await stream
        assert response.status_code == 200
        assert "event: done" in response.text
        assert asyncio.get_running_loop().time() - started > 2 * timeout
    assert server.log.read_text().count("Application startup complete") == 2


async def test_past_the_connection_cap_idle_connections_make_room_and_descriptors_stay_free(
    tmp_path: Path,
) -> None:
    # 1,100 idle connections against a file limit of 1,024: what made every /healthz fail.
    # The header timeout is long here, so that it is the cap that keeps the process answering.
    cap, attackers = 900, 1100
    with _descriptors_for_the_client(attackers + 64):
        async with (
            _serve(
                tmp_path,
                file_limit=True,
                CHATBOT_MAX_CONNECTIONS=str(cap),
                CHATBOT_HEADER_TIMEOUT_SECONDS="60",
            ) as server,
            _holding() as held,
        ):
            for index in range(attackers):
                held.append(await _connect(server.port, PARTIAL_HEAD if index % 2 else b""))
                if index % 100 == 99:
                    await _healthz_within(server, 1)
            # The longest-waiting ones were closed at once to make room, well before the
            # timeout; the process stays under the cap, with descriptors to spare.
            await eventually(
                lambda: sum(one.closed_after is not None for one in held) >= attackers - cap,
                10,
            )
            for _ in range(5):
                await _healthz_within(server, 1)
            assert server.open_descriptors() < cap + 64
    log = server.log.read_text()
    assert f"the file limit ({FILE_LIMIT}) is below" in log
    assert "closing those that have sent no complete request" in log


async def test_at_the_cap_with_every_connection_serving_new_ones_are_refused_at_once(
    tmp_path: Path,
) -> None:
    async with (
        _serve(tmp_path, CHATBOT_MAX_CONNECTIONS="3", CHATBOT_DEMO_DELAY_MS="60") as server,
        httpx.AsyncClient(
            base_url=server.base_url, timeout=30, limits=httpx.Limits(max_connections=3)
        ) as client,
    ):
        streams = [
            asyncio.create_task(
                client.post(
                    "/v1/chat",
                    json={"message": f"hello there {index}"},
                    headers={"Accept": "text/event-stream"},
                )
            )
            for index in range(3)
        ]
        # Their responses have started (uvicorn logs a request as its response starts).
        await eventually(lambda: server.log.read_text().count("POST /v1/chat") == 3, 10)
        async with _holding() as held:
            held.append(refused := await _connect(server.port, REQUEST))
            await eventually(lambda: refused.closed_after is not None, 5)
        assert refused.closed_after is not None
        assert refused.closed_after < 2
        for response in await asyncio.gather(*streams):
            assert response.status_code == 200
            assert "event: done" in response.text
        await _healthz_within(server, 1)
    assert "refusing new ones, every one is serving a request" in server.log.read_text()


async def test_a_stalled_body_or_a_flood_of_pipelined_requests_loses_its_connection(
    tmp_path: Path,
) -> None:
    timeout = 1.0
    stalled_body = (
        b"POST /v1/conversations HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    async with (
        _serve(tmp_path, CHATBOT_HEADER_TIMEOUT_SECONDS=str(timeout)) as server,
        _holding() as held,
    ):
        # A head whole, then a body that stops coming: it holds a place until the timeout.
        held += [await _connect(server.port, stalled_body) for _ in range(5)]
        # Thousands of requests written at once, never read: dropped, not queued in memory.
        flood = await _connect(server.port, REQUEST * 2_000)
        held.append(flood)
        await eventually(lambda: all(one.closed_after is not None for one in held), 15)
        assert all(one.closed_after >= timeout - 0.05 for one in held[:5] if one.closed_after)
        await _healthz_within(server, 1)
