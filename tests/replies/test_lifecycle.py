"""Stopping replies: cancel, checkpoints, crashes, shutdown, and replies run by another process."""

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import delete, event, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.sql import compiler

from chatbot.context.tokens import TokenCounter
from chatbot.conversations.models import Conversation
from chatbot.db import create_engine, create_sessionmaker, utcnow
from chatbot.deps import get_replies
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.replies.bus import InProcessBus
from chatbot.replies.items import Outcome, StopReason
from chatbot.replies.keeper import ReplyKeeper
from chatbot.replies.live import ReplyRef
from chatbot.replies.registry import ReplyRegistry
from chatbot.replies.service import Replies
from tests.fake_upstream import Reply
from tests.support import (
    Service,
    collect_events,
    day_usage,
    eventually,
    read_events,
    read_stored,
    seed_running_reply,
    streamed_text,
)

TOKENS = ["Never", " gonna", " give", " you", " up"]


async def _stored_if(
    service: Service, message_id: str, condition: Callable[[Message], object]
) -> Message | None:
    message = await service.stored_message(message_id)
    return message if condition(message) else None


IN_PROGRESS = MessageStatus.IN_PROGRESS


async def test_cancel_mid_reply_keeps_the_partial_text_and_closes_the_upstream(
    service: Service,
) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    async with service.client.stream(
        "POST",
        f"/v1/conversations/{conversation['id']}/messages?stream=true",
        json={"content": "sing"},
        headers=service.auth(),
    ) as response:
        events = read_events(response)
        start = await anext(events)
        first = await anext(events)
        assert first.data == {"content": "Never"}
        message_id = start.data["assistant_message"]["id"]

        # A second client follows the same reply while it is cancelled.
        async with service.client.stream(
            "GET", f"/v1/messages/{message_id}/stream", headers=service.auth()
        ) as follower:
            follower_events = read_events(follower)
            await anext(follower_events)  # start
            cancelled = await service.client.post(
                f"/v1/messages/{message_id}/cancel", headers=service.auth()
            )
            follower_rest = [event async for event in follower_events]
        rest = [event async for event in events]

    assert cancelled.status_code == 200
    assert cancelled.json()["assistant_message"]["status"] == "cancelled"
    assert cancelled.json()["assistant_message"]["content"] == "Never"
    assert rest[-1].event == "done"
    assert rest[-1].data["assistant_message"]["status"] == "cancelled"
    assert follower_rest[-1].event == "done"
    stored = await service.stored_message(message_id)
    assert stored.status is MessageStatus.CANCELLED
    assert stored.content == "Never"
    # The upstream saw its connection closed while it still held the rest of the reply.
    await eventually(lambda: service.upstream.disconnects)
    assert service.upstream.disconnects == 1

    again = await service.client.post(f"/v1/messages/{message_id}/cancel", headers=service.auth())
    assert again.status_code == 200
    assert again.json()["assistant_message"]["status"] == "cancelled"
    # The conversation takes the next turn.
    next_turn = await service.send(conversation["id"], "again")
    assert next_turn.status_code == 201


async def test_cancelling_a_finished_reply_changes_nothing(service: Service) -> None:
    conversation = await service.create_conversation()
    body = (await service.send(conversation["id"], "hi")).json()
    message_id = body["assistant_message"]["id"]
    response = await service.client.post(
        f"/v1/messages/{message_id}/cancel", headers=service.auth()
    )
    assert response.status_code == 200
    assert response.json()["assistant_message"] == body["assistant_message"]


async def test_running_replies_are_checkpointed(start_service: Any) -> None:
    async with start_service(checkpoint_seconds=0.1) as service:
        conversation = await service.create_conversation()
        gate = asyncio.Event()
        service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
        body = (await service.send(conversation["id"], "sing", background=True)).json()
        message_id = body["assistant_message"]["id"]
        stored = await eventually(lambda: _stored_if(service, message_id, lambda m: m.content))
        assert stored.content == "Never"
        assert stored.status is MessageStatus.IN_PROGRESS
        first_checkpoint = stored.checkpoint_at
        await asyncio.sleep(0.3)
        assert (await service.stored_message(message_id)).checkpoint_at != first_checkpoint
        gate.set()


async def test_replies_left_by_a_dead_process_are_marked_incomplete(
    make_settings: Any, start_service: Any
) -> None:
    settings = make_settings(stale_reply_seconds=5)
    engine = create_engine(settings.database_url)
    sessionmaker = create_sessionmaker(engine)
    from chatbot.db import migrate

    await migrate(engine)
    conversation_id = uuid.uuid4()
    long_ago = utcnow() - timedelta(minutes=5)
    async with sessionmaker() as session:
        session.add(
            Conversation(
                id=conversation_id,
                user_id="alice",
                metadata_={},
                message_count=1,
                created_at=long_ago,
                updated_at=long_ago,
            )
        )
        await session.flush()
        session.add(
            Message(
                conversation_id=conversation_id,
                seq=1,
                role=Role.USER,
                content="hello?",
                status=MessageStatus.COMPLETED,
                created_at=long_ago,
            )
        )
        await session.commit()
    message_id = await seed_running_reply(
        sessionmaker, conversation_id, content="Half of it", checkpoint_at=long_ago
    )
    await engine.dispose()

    async with start_service(stale_reply_seconds=5) as service:
        stored = await service.stored_message(str(message_id))
        assert stored.status is MessageStatus.INCOMPLETE
        assert stored.content == "Half of it"
        assert stored.error is not None
        assert stored.error["code"] == "interrupted"
        turn = await service.send(str(conversation_id), "still there?")
        assert turn.status_code == 201


async def test_a_reply_running_in_another_process_is_followed_through_the_database(
    start_service: Any,
) -> None:
    async with start_service(checkpoint_seconds=0.05) as service:
        conversation = await service.create_conversation()
        body = (await service.send(conversation["id"], "hi")).json()
        message_id = uuid.UUID(body["assistant_message"]["id"])
        # Pretend another instance is generating it: in progress, and not in our registry.
        async with service.state.sessionmaker() as session:
            await session.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(status=MessageStatus.IN_PROGRESS, content="Hel", checkpoint_at=utcnow())
            )
            await session.commit()

        async def other_instance() -> None:
            async with service.state.sessionmaker() as session:
                await session.execute(
                    update(Message)
                    .where(Message.id == message_id)
                    .values(content="Hello, world!", status=MessageStatus.COMPLETED)
                )
                await session.commit()

        events = []
        async with service.client.stream(
            "GET", f"/v1/messages/{message_id}/stream?starting_after=1", headers=service.auth()
        ) as response:
            async for event in read_events(response):
                events.append(event)
                if len(events) == 1:  # the checkpoint seen: the other instance goes on
                    await other_instance()
        deltas = [event.data["content"] for event in events if event.event == "delta"]
        assert "".join(deltas) == "ello, world!"
        assert deltas[0] == "el"
        assert events[-1].event == "done"


async def test_cancel_on_disconnect_when_configured(start_service: Any) -> None:
    async with start_service(cancel_on_disconnect=True) as service:
        conversation = await service.create_conversation()
        gate = asyncio.Event()
        service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
        async with service.client.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages?stream=true",
            json={"content": "sing"},
            headers=service.auth(),
        ) as response:
            events = read_events(response)
            start = await anext(events)
            await anext(events)
        message_id = start.data["assistant_message"]["id"]
        stored = await eventually(
            lambda: _stored_if(service, message_id, lambda m: m.status is not IN_PROGRESS)
        )
        assert stored.status is MessageStatus.CANCELLED
        assert stored.content == "Never"


async def test_shutdown_lets_replies_finish_within_the_grace_period(start_service: Any) -> None:
    async with start_service(shutdown_grace_seconds=5) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=TOKENS, token_delay=0.1))
        body = (await service.send(conversation["id"], "sing", background=True)).json()
        sessionmaker = service.state.sessionmaker
        database_url = service.settings.database_url
    stored = await read_stored(database_url, conversation["id"])
    assert sessionmaker is not None
    [reply] = stored.replies
    assert str(reply.id) == body["assistant_message"]["id"]
    assert reply.status is MessageStatus.COMPLETED
    assert reply.content == "".join(TOKENS)


async def test_deleting_a_conversation_mid_reply_stops_the_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    url = f"/v1/conversations/{conversation['id']}"

    pending = asyncio.create_task(service.send(conversation["id"], "sing"))
    await eventually(lambda: service.upstream.requests)
    await asyncio.sleep(0.1)
    deleted = await service.client.delete(url, headers=service.auth())
    assert deleted.status_code == 204
    response = await pending
    assert response.status_code == 404
    assert response.json()["code"] == "message_not_found"
    await eventually(lambda: service.upstream.disconnects)
    assert service.upstream.disconnects == 1


class _FirstCommitFails(AsyncSession):
    """A session whose first commits in the test fail as if the database went away; with
    `landing`, the commit goes through first and the failure is only reported (a connection
    lost while the server's acknowledgement was on its way)."""

    failures = 1
    landing = False

    async def connection(self, *args: Any, **kwargs: Any) -> AsyncConnection:
        # A statement that is a transaction of its own (the end of a reply on PostgreSQL) asks
        # for an autocommit connection first: a failure that does not land happens there.
        options = kwargs.get("execution_options") or {}
        autocommit = options.get("isolation_level") == "AUTOCOMMIT"
        if autocommit and _FirstCommitFails.failures and not _FirstCommitFails.landing:
            _FirstCommitFails.failures -= 1
            raise OperationalError("BEGIN", {}, ConnectionError("database went away"))
        return await super().connection(*args, **kwargs)

    async def commit(self) -> None:
        if _FirstCommitFails.failures:
            _FirstCommitFails.failures -= 1
            if _FirstCommitFails.landing:
                await super().commit()
            raise OperationalError("COMMIT", {}, ConnectionError("database went away"))
        await super().commit()


async def _turn_with_failing_commits(
    service: Service,
    failures: int,
    retry_seconds: float,
    *,
    landing: bool = False,
    toolsets: list[str] | None = None,
) -> tuple[str, httpx.Response]:
    """A turn whose replies are stored through sessions whose first commits fail."""
    app, state = service.server.app, service.state
    failing = cast(
        async_sessionmaker[AsyncSession],
        async_sessionmaker(state.engine, class_=_FirstCommitFails, expire_on_commit=False),
    )
    settings = service.settings.model_copy(update={"store_retry_seconds": retry_seconds})
    replies = Replies(settings, failing, state.llm, TokenCounter())
    app.dependency_overrides[get_replies] = lambda: replies
    conversation = await service.create_conversation(toolsets=toolsets or [])
    _FirstCommitFails.failures, _FirstCommitFails.landing = failures, landing
    try:
        return conversation["id"], await service.send(conversation["id"], "hi")
    finally:
        app.dependency_overrides.clear()


async def test_a_store_that_landed_though_it_reported_a_failure_is_not_written_twice(
    service: Service,
) -> None:
    conversation_id, response = await _turn_with_failing_commits(
        service, failures=1, retry_seconds=5, landing=True
    )
    assert response.status_code == 201, response.text
    reply = response.json()["assistant_message"]
    assert (reply["status"], reply["content"]) == ("completed", "Hello, world!")
    assert (await service.messages(conversation_id))[-1] == reply
    # The fake upstream reports 11 prompt tokens and one per token: counted once.
    assert await day_usage(service.state.sessionmaker, "alice") == 15


async def test_a_tool_round_whose_store_landed_though_it_failed_is_stored_once(
    service: Service,
) -> None:
    service.upstream.queue(
        Reply(tokens=["Adding"], tool_calls=[("call_1", "add_task", '{"title": "milk"}')]),
        Reply(tokens=["Done"]),
    )
    conversation_id, response = await _turn_with_failing_commits(
        service, failures=1, retry_seconds=5, landing=True, toolsets=["tasks"]
    )
    assert response.status_code == 201, response.text
    stored = await service.messages(conversation_id)
    assert [(m["role"], m["content"][:6], m["status"]) for m in stored] == [
        ("user", "hi", "completed"),
        ("assistant", "Adding", "completed"),
        ("tool", stored[2]["content"][:6], "completed"),
        ("assistant", "Done", "completed"),
    ]
    assert stored[1]["tool_calls"][0]["function"]["name"] == "add_task"
    assert stored[2]["tool_call_id"] == stored[1]["tool_calls"][0]["id"]
    assert await day_usage(service.state.sessionmaker, "alice") == 12 + 12


async def test_a_store_cut_short_by_a_shutdown_still_tells_its_followers(
    service: Service,
) -> None:
    app, state = service.server.app, service.state
    failing = cast(
        async_sessionmaker[AsyncSession],
        async_sessionmaker(state.engine, class_=_FirstCommitFails, expire_on_commit=False),
    )
    settings = service.settings.model_copy(update={"store_retry_seconds": 60})
    replies = Replies(settings, failing, state.llm, TokenCounter())
    app.dependency_overrides[get_replies] = lambda: replies
    conversation = await service.create_conversation()
    _FirstCommitFails.failures, _FirstCommitFails.landing = 10**6, False
    try:
        started = await service.send(conversation["id"], "hi", background=True)
        reply = replies.registry.get(uuid.UUID(started.json()["assistant_message"]["id"]))
        assert reply is not None
        await eventually(lambda: reply.finishing)  # its store retries a database that is away
        await replies.registry.shutdown(0.1)
        outcome = reply.outcome
        assert outcome is not None
        assert outcome.problem is not None
        assert outcome.problem["code"] == "shutdown"
        assert len(replies.registry) == 0
    finally:
        _FirstCommitFails.failures = 0
        app.dependency_overrides.clear()


async def test_a_reply_whose_store_fails_once_is_stored_on_the_retry(service: Service) -> None:
    _, response = await _turn_with_failing_commits(service, failures=1, retry_seconds=5)
    assert response.status_code == 201
    assert response.json()["assistant_message"]["status"] == "completed"
    assert response.json()["assistant_message"]["content"] == "Hello, world!"


async def test_a_reply_that_cannot_be_stored_still_frees_its_conversation(
    service: Service,
) -> None:
    # The store fails and the retry bound is spent; the fallback that marks it failed works.
    conversation_id, response = await _turn_with_failing_commits(
        service, failures=1, retry_seconds=0.01
    )
    assert response.status_code == 503
    assert response.json()["code"] == "storage_failed"
    reply = (await service.messages(conversation_id))[-1]
    assert reply["status"] == "incomplete"
    assert reply["error"]["code"] == "storage_failed"
    assert reply["content"] == "Hello, world!"  # the last store keeps the text
    again = await service.send(conversation_id, "hi")
    assert again.status_code == 201


async def test_nul_bytes_from_the_model_are_replaced_not_fatal(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["a\u0000b", "\u0000", "c"], model="m" * 300))
    response = await service.send(conversation["id"], "hi")
    assert response.status_code == 201
    reply = response.json()["assistant_message"]
    assert reply["content"] == "a\ufffdb\ufffdc"
    assert reply["model"] == "m" * 200


async def test_a_stop_during_the_store_lets_the_store_finish() -> None:
    registry = ReplyRegistry(InProcessBus())
    reply = registry.open(ReplyRef(uuid.uuid4(), uuid.uuid4(), "alice"), seq=2)
    stored = asyncio.Event()

    async def storing() -> None:
        reply.begin_finishing()
        await asyncio.sleep(0.1)  # the final commit
        stored.set()
        reply.finish(Outcome(message={"status": "completed"}))

    registry.start(reply, storing())
    await asyncio.sleep(0.01)
    assert await registry.stop(reply.message_id, StopReason.CANCELLED)
    assert reply.stop_reason is None
    assert (await reply.wait()).message == {"status": "completed"}
    assert stored.is_set()


async def test_a_reply_cancelled_on_another_instance_stops_here(start_service: Any) -> None:
    async with start_service(checkpoint_seconds=0.05) as service:
        conversation = await service.create_conversation()
        gate = asyncio.Event()
        service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
        body = (await service.send(conversation["id"], "sing", background=True)).json()
        message_id = uuid.UUID(body["assistant_message"]["id"])
        async with service.client.stream("GET", body["stream_url"]) as response:
            events = read_events(response)
            await anext(events)
            assert (await anext(events)).data == {"content": "Never"}
            # Another instance's cancel endpoint wrote this.
            async with service.state.sessionmaker() as session:
                await session.execute(
                    update(Message)
                    .where(Message.id == message_id)
                    .values(status=MessageStatus.CANCELLED, content="Never")
                )
                await session.commit()
            rest = [event async for event in events]
        assert rest[-1].event == "done"
        assert rest[-1].data["assistant_message"]["status"] == "cancelled"
        await eventually(lambda: service.upstream.disconnects)
        assert service.upstream.disconnects == 1


async def test_a_conversation_deleted_elsewhere_stops_its_reply(start_service: Any) -> None:
    async with start_service(checkpoint_seconds=0.05) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=TOKENS, gate=asyncio.Event()))
        pending = asyncio.create_task(service.send(conversation["id"], "sing"))
        await eventually(lambda: service.upstream.requests)
        async with service.state.sessionmaker() as session:
            await session.execute(
                delete(Conversation).where(Conversation.id == uuid.UUID(conversation["id"]))
            )
            await session.commit()
        response = await pending
        assert response.status_code == 404
        await eventually(lambda: service.upstream.disconnects)
        assert service.upstream.disconnects == 1


async def test_the_sweep_and_checkpoints_leave_live_and_finishing_replies_alone(
    service: Service,
) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    body = (await service.send(conversation["id"], "sing", background=True)).json()
    message_id = uuid.UUID(body["assistant_message"]["id"])
    replies = service.state.replies
    eager = ReplyKeeper(
        service.state.sessionmaker,
        replies.registry,
        replies.bus,
        interval_seconds=1,
        stale_after_seconds=0.001,
    )
    await asyncio.sleep(0.05)
    assert await eager.sweep() == []  # running here, whatever its checkpoint says
    generation = service.running(message_id)
    assert generation is not None
    generation.begin_finishing()  # as during the final store...
    async with service.state.sessionmaker() as session:  # ...which has already committed
        await session.execute(
            update(Message).where(Message.id == message_id).values(status=MessageStatus.COMPLETED)
        )
        await session.commit()
    await eager.checkpoint()
    assert generation.stop_reason is None
    gate.set()
    await generation.wait()


async def test_resuming_inside_a_token_of_a_live_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    gate = asyncio.Event()
    service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
    body = (await service.send(conversation["id"], "sing", background=True)).json()
    message_id = body["assistant_message"]["id"]
    await eventually(lambda: service.upstream.requests)
    await asyncio.sleep(0.05)
    async with service.client.stream(
        "GET", f"/v1/messages/{message_id}/stream?starting_after=2", headers=service.auth()
    ) as response:
        events = read_events(response)
        first = await anext(events)
        assert first.data == {"content": "ver"}
        assert first.id == f"{message_id}:5"
        gate.set()
        rest = [event async for event in events]
    joined = (
        "Ne"
        + first.data["content"]
        + "".join(event.data["content"] for event in rest if event.event == "delta")
    )
    assert joined == "".join(TOKENS)


async def test_a_fresh_stream_url_for_an_existing_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    body = (await service.send(conversation["id"], "hi")).json()
    message_id = body["assistant_message"]["id"]
    minted = await service.client.post(
        f"/v1/messages/{message_id}/stream_url", headers=service.auth()
    )
    assert minted.status_code == 200
    async with service.client.stream("GET", minted.json()["stream_url"]) as response:
        events = await collect_events(response)
    assert events[-1].data["assistant_message"]["content"] == "Hello, world!"
    other = await service.client.post(
        f"/v1/messages/{message_id}/stream_url", headers=service.auth("mallory")
    )
    assert other.status_code == 404
    blank = await service.client.get(
        f"/v1/conversations/{conversation['id']}/stream",
        params={"content": "  "},
        headers=service.auth(),
    )
    assert blank.status_code == 422


async def test_a_reply_past_the_longest_stored_is_cut_there_and_incomplete(
    start_service: Any,
) -> None:
    async with start_service(max_reply_chars=50) as service:
        service.upstream.queue(Reply(tokens=["word "] * 100))
        conversation = await service.create_conversation()
        events = await service.stream(conversation["id"], "talk forever")
        stored = (await service.messages(conversation["id"]))[-1]
        # The conversation takes the next turn.
        assert (await service.send(conversation["id"], "enough")).status_code == 201
    assert stored["status"] == "incomplete"
    assert stored["finish_reason"] == "length"
    assert stored["error"]["code"] == "reply_too_long"
    assert stored["content"] == ("word " * 10)[:50]
    assert streamed_text(events) == stored["content"]
    assert events[-1].event == "error"


async def test_a_turn_takes_few_statements_and_its_end_one_on_postgresql(
    service: Service,
) -> None:
    # Each statement is a round trip (on SQLite a hand-off to its thread): a turn's are
    # counted, so that one added on the way to the model or at its end is seen.
    conversation = await service.create_conversation()
    assert (await service.send(conversation["id"], "hello")).status_code == 201
    await service.state.chores.idle()  # the first turn's title is written
    statements: list[str] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    engine = service.state.engine.sync_engine
    event.listen(engine, "before_cursor_execute", executed)
    try:
        response = await service.send(conversation["id"], "hello again")
        assert response.status_code == 201
        await service.state.chores.idle()
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    if engine.dialect.name == "postgresql":
        # The user's turn lock, the claim, the history, both messages; the end, the release
        # and the day's usage in one.
        assert statements == ["SELECT", "UPDATE", "SELECT", "INSERT", "WITH"]
    else:  # SQLite's one writer is the lock
        assert statements == ["UPDATE", "SELECT", "INSERT", "UPDATE", "UPDATE", "INSERT"]
    stored = (await service.messages(conversation["id"]))[-1]
    assert stored["status"] == "completed"
    assert (await day_usage(service.state.sessionmaker, "alice")) > 0


async def test_a_turn_compiles_no_sql_once_its_statements_were_seen(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compiling a statement costs more CPU than executing it: every statement on a turn's way
    # must come from SQLAlchemy's compiled cache after the first turn (a multi-row INSERT
    # built with `values([...])` did not, and was compiled on every turn).
    conversation = await service.create_conversation()
    for content in ("hello", "hello again"):
        assert (await service.send(conversation["id"], content)).status_code == 201
    await service.state.chores.idle()
    compiled: list[str] = []
    original = compiler.SQLCompiler.__init__

    def compiling(self: compiler.SQLCompiler, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        compiled.append(self.string)

    monkeypatch.setattr(compiler.SQLCompiler, "__init__", compiling)
    for content in ("one", "two", "three"):
        assert (await service.send(conversation["id"], content)).status_code == 201
        assert (await service.stream(conversation["id"], content))[-1].event == "done"
    await service.state.chores.idle()
    assert compiled == []
