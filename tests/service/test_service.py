"""Starting the service: demo model, migrations, the command line, settings."""

import asyncio
import gc
import inspect
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import httpx
import jwt
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from sqlalchemy import Connection, select

from chatbot.app import create_app
from chatbot.auth.tokens import issue_token
from chatbot.config import Settings, normalize_database_url
from chatbot.conversations.models import Conversation
from chatbot.db import Base, create_engine, migrate
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.tasks import models as _tasks  # noqa: F401  (its table is in the migrations)
from tests.fake_upstream import FakeUpstream, Reply
from tests.support import JWT_SECRET, eventually, free_port


async def test_demo_model_answers_when_no_provider_is_configured(start_service: Any) -> None:
    async with start_service(openai_base_url=None, openai_api_key=None, demo_delay_ms=1) as service:
        events = await service.stream_chat("Hello demo")
        deltas = [event for event in events if event.event == "delta"]
        assert len(deltas) > 10
        done = events[-1].data["assistant_message"]
        assert done["model"] == "demo-offline"
        assert done["status"] == "completed"
        assert "Hello demo" in done["content"]
        assert service.upstream.requests == []


async def test_the_demo_model_runs_the_task_tools_with_the_default_settings(
    start_service: Any,
) -> None:
    # What make run has: no provider, and the toolsets a new conversation gets by default.
    defaults = Settings(_env_file=None).default_toolsets
    async with start_service(
        openai_base_url=None, openai_api_key=None, demo_delay_ms=1, default_toolsets=defaults
    ) as service:
        events = await service.stream_chat("Add a task to buy milk")
        call = next(event.data for event in events if event.event == "tool_call")
        assert (call["name"], json.loads(call["arguments"])) == ("add_task", {"title": "buy milk"})
        result = next(event.data for event in events if event.event == "tool_result")
        assert result["status"] == "ok"
        done = events[-1].data
        assert done["assistant_message"]["content"] == 'Added "buy milk" to your tasks.'
        listed = await service.client.post(
            "/v1/chat",
            json={
                "message": "what are my tasks?",
                "conversation_id": done["assistant_message"]["conversation_id"],
            },
            headers=service.auth(),
        )
        assert listed.json()["assistant_message"]["content"] == "Your open tasks:\n1. buy milk"
        assert service.upstream.requests == []


def _schema_differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_match_the_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # applying twice is harmless
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_differences) == []
    finally:
        await engine.dispose()


def test_database_urls_get_async_drivers() -> None:
    assert normalize_database_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_database_url("sqlite:///./x.db") == "sqlite+aiosqlite:///./x.db"
    assert Settings(_env_file=None).database_url.startswith("sqlite+aiosqlite://")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/chat")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("CHATBOT_MODEL", "llama3.1")
    monkeypatch.setenv("CHATBOT_PORT", "9001")
    settings = Settings(_env_file=None)
    assert settings.database_url == "postgresql+asyncpg://db/chat"
    assert settings.model == "llama3.1"
    assert settings.port == 9001
    assert not settings.uses_demo_model


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatbot", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
        check=False,
    )


def test_cli_prints_a_token_that_the_service_accepts() -> None:
    result = _cli("token", "alice", env={"CHATBOT_JWT_SECRET": JWT_SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] > claims["iat"]
    refused = _cli("token", "alice", env={})
    assert refused.returncode != 0
    assert "CHATBOT_JWT_SECRET" in refused.stderr


def test_cli_migrates_and_refuses_an_unsafe_start(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    migrated = _cli("migrate", env={"DATABASE_URL": url})
    assert migrated.returncode == 0, migrated.stderr
    unsafe = _cli("serve", env={"DATABASE_URL": url, "CHATBOT_HOST": "0.0.0.0"})
    assert unsafe.returncode != 0
    assert "loopback" in unsafe.stderr


def test_cli_names_its_version_and_refuses_bad_options(tmp_path: Any) -> None:
    shown = _cli("--version", env={})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"chatbot {version('chatbot')}"
    url = f"sqlite:///{tmp_path}/cli.db"
    for option in (["--port", "70000"], ["--port", "-1"], ["--port", "x"], ["--workers", "0"]):
        refused = _cli("serve", *option, env={"DATABASE_URL": url})
        assert refused.returncode == 2, option
        assert "Traceback" not in refused.stderr
    # --host reaches the start-up check, which still refuses to serve open without auth.
    unsafe = _cli("serve", "--host", "0.0.0.0", env={"DATABASE_URL": url})
    assert unsafe.returncode != 0
    assert "loopback" in unsafe.stderr
    # A bad setting is named, its value never shown: it may be a secret.
    invalid = _cli("migrate", env={"DATABASE_URL": url, "CHATBOT_PORT": "sk-not-a-port"})
    assert invalid.returncode == 1
    assert "port: Input should be a valid integer" in invalid.stderr
    assert "sk-not-a-port" not in invalid.stderr
    assert "Traceback" not in invalid.stderr


async def test_serve_listens_where_the_command_line_says(tmp_path: Any) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot", "serve", "--host", "127.0.0.1", "--port", str(port),
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path}/port.db",
             "CHATBOT_PORT": "1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await eventually(lambda: _answers(client), 30)
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)


async def test_shutdown_stores_a_running_reply_as_incomplete(start_service: Any) -> None:
    async with start_service(shutdown_grace_seconds=0.2) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=["one", " two"], gate=asyncio.Event()))
        async with service.client.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages?stream=true",
            json={"content": "hi"},
            headers=service.auth(),
        ) as response:
            events = response.aiter_lines()
            while "delta" not in await anext(events):
                pass
        conversation_id = conversation["id"]
        database_url = service.settings.database_url
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(Message.status, Message.content).where(Message.role == Role.ASSISTANT)
                )
            ).all()
            active = await connection.scalar(
                select(Conversation.active_reply_id).where(
                    Conversation.id == uuid.UUID(conversation_id)
                )
            )
    finally:
        await engine.dispose()
    assert rows == [(MessageStatus.INCOMPLETE, "one")]
    assert active is None


@dataclass
class _Workers:
    base_url: str
    output: str = ""
    """Everything the processes printed (uvicorn's access log goes to stdout), once stopped."""


@asynccontextmanager
async def _two_workers(
    tmp_path: Any, upstream: FakeUpstream, **env: str
) -> AsyncIterator[_Workers]:
    """`chatbot serve --workers 2` on a free port, answering, stopped on leaving."""
    port = free_port()
    environment = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": f"sqlite:///{tmp_path}/workers.db",
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "sk-test",
        # The command line wins: every worker must see the port it names.
        "CHATBOT_PORT": "1",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot", "serve", "--workers", "2", "--port", str(port),
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    workers = _Workers(f"http://127.0.0.1:{port}")
    try:
        async with httpx.AsyncClient(base_url=workers.base_url) as client:
            await eventually(lambda: _answers(client), 30)
        yield workers
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        workers.output = output.decode()


async def test_serve_with_two_workers_answers_and_redacts_each_workers_log(
    tmp_path: Any, upstream: FakeUpstream
) -> None:
    async with (
        _two_workers(tmp_path, upstream, CHATBOT_JWT_SECRET=JWT_SECRET) as workers,
        httpx.AsyncClient(base_url=workers.base_url) as client,
    ):
        token = issue_token(Settings(_env_file=None, jwt_secret=JWT_SECRET), "alice")
        headers = {"Authorization": f"Bearer {token}"}
        # Several turns, so that both workers (one socket, two processes) serve some.
        for index in range(6):
            response = await client.post(
                "/v1/chat", json={"message": f"hello {index}"}, headers=headers
            )
            assert response.status_code == 201, response.text
            assert response.json()["assistant_message"]["status"] == "completed"
        await client.get("/healthz", params={"access_token": "not-for-the-log"})
        # Names spelled another way reach the application as the same parameter, or as one
        # it does not know: the log shows neither value.
        message = "/v1/messages/00000000-0000-0000-0000-000000000000"
        dodges = [
            f"{message}/stream?access_tok%65n={token}",
            f"{message}/stream?Access_Token={token}",
            f"{message}/stream?tok%65n=secret-stream-token",
            "/v1/conversations/00000000-0000-0000-0000-000000000000/stream?con%74ent=my+secret+message",
            f"/healthz?{token}",
        ]
        for target in dodges:
            await client.get(target, headers={"Authorization": f"Bearer {token}"})
        await client.get("/v1/conversations?limit=5", headers=headers)
    log = workers.output
    assert log.count("Application startup complete") == 2, log
    assert "access_token=[redacted]" in log
    assert "not-for-the-log" not in log
    for secret in (token, "secret-stream-token", "my+secret+message"):
        assert secret not in log, secret
    assert "?limit=5" in log  # what carries nothing secret stays readable
    assert len(upstream.requests) >= 6


async def _answers(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


def test_no_dependency_waits_for_a_thread() -> None:
    # FastAPI runs a plain `def` dependency in its thread pool: a hand-off to a thread and back
    # on every request, for what is a dictionary lookup. Every one of ours is `async def`.
    app = create_app(Settings(_env_file=None))
    sync = set()

    def walk(dependant: Dependant) -> None:
        for dependency in dependant.dependencies:
            call = dependency.call
            if call is not None and not (
                inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
            ):
                sync.add(getattr(call, "__qualname__", repr(call)))
            walk(dependency)

    routes = [route for route in _routes(app) if getattr(route, "dependant", None) is not None]
    assert len(routes) > 10
    for route in routes:
        walk(route.dependant)
    assert sync == set()


def _routes(app: Any) -> list[Any]:
    """Every route, also of routers that newer FastAPI releases include lazily."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # before that, every route is listed on the app itself
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


async def test_a_stream_url_from_one_worker_opens_on_any_worker_without_a_jwt_secret(
    tmp_path: Any, upstream: FakeUpstream
) -> None:
    async with (
        _two_workers(tmp_path, upstream) as workers,
        httpx.AsyncClient(base_url=workers.base_url) as client,
    ):
        for index in range(8):
            started = await client.post(
                "/v1/chat", json={"message": f"hello {index}", "background": True}
            )
            assert started.status_code == 202, started.text
            # A new connection each time: the kernel may hand it to either worker.
            async with httpx.AsyncClient(base_url=workers.base_url) as fresh:
                followed = await fresh.get(started.json()["stream_url"])
            assert followed.status_code == 200, followed.text
            assert "event: done" in followed.text


def test_serve_moves_what_the_app_is_built_of_out_of_the_collectors_way() -> None:
    # What `chatbot serve` builds before it serves lives as long as the process; left to the
    # collector, every full collection walks it all again (tenths of a second a time).
    from chatbot.cli import _settled

    app = FastAPI()
    before = gc.get_freeze_count()
    try:
        assert _settled(app) is app
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
