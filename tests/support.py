"""What every test file shares: the fixtures (databases, the fake model, the service) and the
helpers that send, stream and follow turns, seed histories, read what the database holds, run
the task tools and read what a model client streams.

Every test talks to a real uvicorn server over a loopback socket, backed by SQLite and, when
TEST_DATABASE_URL is set, PostgreSQL too; the model is a real OpenAI-compatible server of ours.
`conftest.py` registers the fixtures defined here."""

import asyncio
import gc
import inspect
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from chatbot.app import create_app
from chatbot.auth.tokens import issue_token
from chatbot.config import Settings, normalize_database_url
from chatbot.conversations.models import Conversation
from chatbot.db import create_engine, create_sessionmaker, migrate
from chatbot.llm.client import CompletionRequest, LLMClient, StreamEvent
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.quotas.models import DailyUsage
from chatbot.replies.live import LiveReply
from chatbot.state import AppState, state_of
from chatbot.tasks.tools import TASKS
from chatbot.tools.base import ToolContext, ToolResult, Toolset, run_tool
from tests.fake_upstream import UTILITY_MODEL, FakeUpstream

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
ROOT = Path(__file__).resolve().parents[1]
"""The repository's root: where `src/`, `alembic/` and `pyproject.toml` are."""
_ENV_PREFIXES = ("CHATBOT_", "OPENAI_", "DATABASE_URL", "REDIS_URL")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test alone, never from the machine running the suite."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name)


# --- databases --------------------------------------------------------------------------------


async def _recreate_database(url: str, name: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _drop_database(url: str, name: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(worker_id: str, testrun_uid: str) -> Iterator[str | None]:
    """A database of this run's and this xdist worker's own (so that two runs on one server
    never meet), migrated once; tests truncate it, and it is dropped at the end."""
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        if os.environ.get("CHATBOT_REQUIRE_POSTGRES"):
            pytest.fail("TEST_DATABASE_URL is required in CI")
        yield None
        return
    url = make_url(normalize_database_url(base))
    server = _asyncpg_dsn(url.render_as_string(hide_password=False))
    name = f"chatbot_test_{testrun_uid[:8]}_{worker_id}"
    asyncio.run(_recreate_database(server, name))
    target = url.set(database=name).render_as_string(hide_password=False)
    asyncio.run(_migrate(target))
    yield target
    asyncio.run(_drop_database(server, name))


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Any, postgres_url: str | None
) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/chatbot.db"
    if postgres_url is None:
        pytest.skip(
            "the PostgreSQL run of this test: TEST_DATABASE_URL is not set "
            "(e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test; .ci/run sets it)"
        )
    connection = await asyncpg.connect(_asyncpg_dsn(postgres_url))
    try:
        await connection.execute(
            "TRUNCATE conversations, messages, idempotency_keys, daily_usage, tasks"
        )
    finally:
        await connection.close()
    return postgres_url


# --- the model --------------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = await FakeUpstream().start()
    yield server
    await server.stop()


async def model_events(client: LLMClient, request: CompletionRequest) -> list[StreamEvent]:
    """Everything a model client streams for one request, read to its end (the client stays
    open: closing it is the caller's)."""
    return [event async for event in client.stream(request)]


# --- the service ------------------------------------------------------------------------------


def settings_for(database_url: str, upstream_url: str, /, **overrides: Any) -> Settings:
    """The settings every test starts from: this database, this fake model, generous limits."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "auto_migrate": True,
        "openai_base_url": upstream_url,
        "openai_api_key": "sk-test-key",
        "upstream_max_retries": 0,
        "upstream_timeout": 5,
        "auth": "jwt",
        "jwt_secret": JWT_SECRET,
        "model": "gpt-4o-mini",
        "utility_model": UTILITY_MODEL,
        "rate_limit": "10000/minute",
        # Tools are offered where a test asks for them: their definitions cost prompt tokens.
        "default_toolsets": [],
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
async def sessionmaker(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the test's database, migrated, for tests below the HTTP layer."""
    engine = create_engine(database_url)
    await migrate(engine)
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def make_settings(database_url: str, upstream: FakeUpstream) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_for(database_url, upstream.base_url, **overrides)

    return make


# --- Server-Sent Events -----------------------------------------------------------------------


@dataclass
class Event:
    event: str
    data: Any
    id: str | None = None
    comments: list[str] = field(default_factory=list)


async def read_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Parse an SSE body as it arrives, one event per blank line."""
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    comments: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data_lines or fields:
                raw = "\n".join(data_lines)
                yield Event(
                    event=fields.get("event", "message"),
                    data=json.loads(raw) if raw else None,
                    id=fields.get("id"),
                    comments=comments,
                )
            fields, data_lines, comments = {}, [], []
            continue
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data_lines.append(value)
        else:
            fields[name] = value


async def collect_events(response: httpx.Response) -> list[Event]:
    return [event async for event in read_events(response)]


def streamed_text(events: Iterable[Event]) -> str:
    """The text a reply's stream carried: its deltas joined, whatever else came between."""
    return "".join(event.data["content"] for event in events if event.event == "delta")


class LiveServer:
    """The app under uvicorn on an ephemeral loopback port, in the test's event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.url = ""
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "LiveServer":
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the server did not start")
            await asyncio.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


@dataclass
class Service:
    server: LiveServer
    settings: Settings
    client: httpx.AsyncClient
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return self.server.url

    def auth(self, user_id: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(self.settings, user_id)}"}

    async def create_conversation(self, user_id: str = "alice", **body: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/conversations", json=body, headers=self.auth(user_id)
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    async def messages(self, conversation_id: str, user_id: str = "alice") -> list[dict[str, Any]]:
        response = await self.client.get(
            f"/v1/conversations/{conversation_id}/messages",
            params={"limit": 100},
            headers=self.auth(user_id),
        )
        assert response.status_code == 200, response.text
        data: list[dict[str, Any]] = response.json()["data"]
        return data

    @property
    def state(self) -> AppState:
        """What the service's lifespan built: its replies, chores, engine..."""
        return state_of(self.server.app)

    async def send(
        self, conversation_id: str, content: str, *, user: str = "alice", **body: Any
    ) -> httpx.Response:
        """A turn answered as JSON (202 with `background=True`), whatever its status."""
        return await self.client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": content, **body},
            headers=self.auth(user),
        )

    async def stream(
        self, conversation_id: str, content: str, *, user: str = "alice", **body: Any
    ) -> list[Event]:
        """A turn answered as Server-Sent Events, read to its end."""
        async with self.client.stream(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": content, **body},
            headers=self.auth(user) | {"Accept": "text/event-stream"},
        ) as response:
            assert response.status_code == 200, await response.aread()
            return await collect_events(response)

    async def stream_chat(self, message: str, *, user: str = "alice", **body: Any) -> list[Event]:
        """`POST /v1/chat` (a new conversation, or `conversation_id`'s) answered as Server-Sent
        Events, read to its end."""
        async with self.client.stream(
            "POST",
            "/v1/chat",
            json={"message": message, **body},
            headers=self.auth(user) | {"Accept": "text/event-stream"},
        ) as response:
            assert response.status_code == 200, await response.aread()
            return await collect_events(response)

    async def follow(self, reply_id: str, *, after: int = 0, user: str = "alice") -> list[Event]:
        """A reply followed from a position (`Last-Event-ID`) to its end."""
        headers = self.auth(user) | {"Last-Event-ID": f"{reply_id}:{after}"}
        async with self.client.stream(
            "GET", f"/v1/messages/{reply_id}/stream", headers=headers
        ) as response:
            assert response.status_code == 200, await response.aread()
            return await collect_events(response)

    def running(self, reply_id: str | uuid.UUID) -> LiveReply | None:
        """The reply as its producer holds it, while it runs here."""
        return self.state.replies.registry.get(uuid.UUID(str(reply_id)))

    async def stored_message(self, message_id: str | uuid.UUID) -> Message:
        """The message's row as the service's database holds it now, read afresh."""
        async with self.state.sessionmaker() as session:
            row = await session.get(Message, uuid.UUID(str(message_id)), populate_existing=True)
        assert row is not None, f"no message {message_id}"
        return row


@pytest.fixture
def start_service(
    make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> Callable[..., Any]:
    """`async with start_service(**settings) as service:` for tests that need other settings."""

    class _Running:
        def __init__(self, settings: Settings, toolsets: Iterable[Toolset]) -> None:
            self.settings = settings
            self.server = LiveServer(create_app(settings, toolsets=toolsets))
            self.client: httpx.AsyncClient | None = None

        async def __aenter__(self) -> Service:
            await self.server.__aenter__()
            self.client = httpx.AsyncClient(base_url=self.server.url, timeout=20)
            return Service(self.server, self.settings, self.client, upstream)

        async def __aexit__(self, *exc: object) -> None:
            assert self.client is not None
            await self.client.aclose()
            await self.server.__aexit__(*exc)

    def start(toolsets: Iterable[Toolset] = (), **overrides: Any) -> _Running:
        return _Running(make_settings(**overrides), toolsets)

    return start


@pytest.fixture
async def service(start_service: Callable[..., Any]) -> AsyncIterator[Service]:
    async with start_service() as running:
        yield running


async def listening(port: int) -> bool:
    """Whether something accepts connections on this loopback port (a process starting up)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def free_port() -> int:
    """A loopback port nobody listens on, for a service a test starts as a process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(
    condition: Callable[[], object | Awaitable[object]], seconds: float = 5.0
) -> Any:
    """Wait, bounded, for a condition that another task will make true; returns its value.
    The condition may be a coroutine function (a query, an API call)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.01)


async def final_reply(
    service: "Service", conversation_id: str, seconds: float = 10.0, *, user: str = "alice"
) -> Any:
    """The conversation's last message once it is no longer being generated."""

    async def finished() -> dict[str, Any] | None:
        messages = await service.messages(conversation_id, user)
        return messages[-1] if messages and messages[-1]["status"] != "in_progress" else None

    return await eventually(finished, seconds)


# --- the database, read and written past the service ---------------------------------------


@dataclass(frozen=True)
class Stored:
    """A conversation's rows as the database holds them."""

    rows: list[Message]
    conversation: Conversation

    @property
    def replies(self) -> list[Message]:
        return [row for row in self.rows if row.role is Role.ASSISTANT]


async def read_stored(database_url: str, conversation_id: str) -> Stored:
    """The conversation's rows, read over a connection of the test's own, not the service's."""
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with AsyncSession(engine) as session:
            rows = await session.scalars(
                select(Message)
                .where(Message.conversation_id == uuid.UUID(conversation_id))
                .order_by(Message.seq)
            )
            messages = list(rows)
            conversation = await session.get(Conversation, uuid.UUID(conversation_id))
    finally:
        await engine.dispose()
    assert conversation is not None
    return Stored(messages, conversation)


async def seed_history(
    sessionmaker: async_sessionmaker[AsyncSession], conversation_id: uuid.UUID, count: int
) -> None:
    """`count` finished messages, user and assistant in turn, as if sent one by one."""
    async with sessionmaker() as session:
        session.add_all(
            Message(
                conversation_id=conversation_id,
                seq=seq,
                role=Role.USER if seq % 2 else Role.ASSISTANT,
                content=f"message {seq}",
                token_count=3,
                status=MessageStatus.COMPLETED,
            )
            for seq in range(1, count + 1)
        )
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(message_count=count)
        )
        await session.commit()


async def seed_running_reply(
    sessionmaker: async_sessionmaker[AsyncSession],
    conversation_id: uuid.UUID,
    *,
    content: str,
    checkpoint_at: datetime,
) -> uuid.UUID:
    """A reply another process is generating: `in_progress` at the conversation's next
    position, last checkpointed at `checkpoint_at`, the conversation claimed for it."""
    reply_id = uuid.uuid4()
    async with sessionmaker() as session:
        conversation = await session.get(Conversation, conversation_id)
        assert conversation is not None
        seq = conversation.message_count + 1
        session.add(
            Message(
                id=reply_id,
                conversation_id=conversation_id,
                seq=seq,
                role=Role.ASSISTANT,
                content=content,
                status=MessageStatus.IN_PROGRESS,
                created_at=checkpoint_at,
                checkpoint_at=checkpoint_at,
            )
        )
        conversation.message_count = seq
        conversation.active_reply_id = reply_id
        await session.commit()
    return reply_id


async def day_usage(sessionmaker: async_sessionmaker[AsyncSession], user_id: str) -> int:
    """The tokens the user's day has recorded."""
    async with sessionmaker() as session:
        used = await session.scalar(
            select(DailyUsage.total_tokens).where(DailyUsage.user_id == user_id)
        )
    return int(used or 0)


async def run_task_tool(
    sessionmaker: async_sessionmaker[AsyncSession],
    user_id: str,
    name: str,
    arguments: dict[str, Any] | str,
) -> ToolResult:
    """One of the task tools run for the user as a turn runs it: arguments as the model writes
    them (JSON text, or a dict to encode), results cut at the service's default 16,000
    characters, and 5 s to answer."""
    tool = TASKS.get(name)
    assert tool is not None, f"no task tool {name}"
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return await run_tool(
        tool, ToolContext(user_id, sessionmaker), raw, timeout_seconds=5, max_result_chars=16_000
    )


# --- a database that stops answering --------------------------------------------------------


class TcpProxy:
    """A TCP relay to a server, which can stop accepting and cut what it relays, as a database
    host that restarts or drops off the network does; then accept again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._silent = False
        self.port = 0

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def refuse(self) -> None:
        """Stop listening (new connections are refused) and cut the open ones."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._transports):
            writer.transport.abort()
        self._transports.clear()
        await self._server.wait_closed()

    def go_silent(self) -> None:
        """Keep every connection open, and accept new ones, but carry nothing either way: a
        network partition, where nothing is refused and nothing answers."""
        self._silent = True

    async def stop(self) -> None:
        await self.refuse()
        for pipe in list(self._pipes):
            pipe.cancel()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._silent:
            self._transports.add(writer)
            try:
                while await reader.read(65536):  # swallowed until the client gives up
                    pass
            except ConnectionError:
                pass
            finally:
                self._transports.discard(writer)
                writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if self._silent:
                        continue
                    target.write(data)
                    await target.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                target.transport.abort()

        pipes = [
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        self._transports -= {writer, upstream_writer}


class DatabaseOutage:
    """The service's database refusing connections for a while: PostgreSQL behind a relay
    that stops accepting and cuts its connections; SQLite with its file's folder moved away
    (so no connection can open it) and the service's idle connections closed."""

    def __init__(self, database_url: str, workdir: Path) -> None:
        self._proxy: TcpProxy | None = None
        self._folder = workdir / "database"
        url = make_url(database_url)
        if url.get_backend_name() == "sqlite":
            self._folder.mkdir()
            self.database_url = f"sqlite+aiosqlite:///{self._folder}/chatbot.db"
        else:
            self._proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
            self._url = url
            self.database_url = ""

    async def __aenter__(self) -> "DatabaseOutage":
        if self._proxy is not None:
            await self._proxy.start()
            self.database_url = self._url.set(
                host="127.0.0.1", port=self._proxy.port
            ).render_as_string(hide_password=False)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._proxy is not None:
            await self._proxy.stop()
            return
        # SQLite: a connection in use when the folder moved away can be dropped by the pool
        # unclosed. Collected here, where the outage made it, with aiosqlite's warning about it
        # silenced; else it is collected, and fails, in whatever test runs next.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"<aiosqlite\.core\.Connection .* was deleted before being closed"
            )
            gc.collect()

    async def begin(self, service: "Service") -> None:
        if self._proxy is not None:
            await self._proxy.refuse()
            return
        self._folder.rename(self._folder.with_name("away"))
        await service.state.engine.dispose()

    def partition(self) -> None:
        """PostgreSQL only: the database host drops off the network without refusing."""
        assert self._proxy is not None
        self._proxy.go_silent()

    async def end(self) -> None:
        if self._proxy is not None:
            await self._proxy.start()
            return
        self._folder.with_name("away").rename(self._folder)


# --- Redis --------------------------------------------------------------------------------------


class RedisServer:
    """A Redis of the test's own on a free loopback port, which the test may stop, restart
    (empty, as a restarted Redis without persistence is) or start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CHATBOT_REQUIRE_POSTGRES"):
                pytest.fail("redis-server is required in CI")
            pytest.skip("redis-server is not installed")
        self._process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await eventually(lambda: listening(self.port), 10)
        return self

    async def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            await self._process.wait()
            self._process = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await RedisServer().start()
    yield server
    await server.stop()
