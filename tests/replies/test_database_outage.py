"""A reply that finishes while the database refuses connections is kept in memory and stored
whole once the database answers again; its conversation is free the moment the store lands."""

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.conversations.models import Conversation
from chatbot.db import create_engine, is_unreachable, utcnow
from chatbot.messages.models import Message, MessageStatus
from chatbot.replies import repository as replies
from tests.fake_upstream import Reply
from tests.support import (
    DatabaseOutage,
    Service,
    eventually,
    free_port,
    read_events,
    read_stored,
    seed_running_reply,
)

TOKENS = ["Stored", " whole", ",", " though", " the", " database", " was", " away"]


async def test_a_reply_finished_during_an_outage_is_stored_whole_when_the_database_returns(
    start_service: Any, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with DatabaseOutage(database_url, tmp_path) as outage:
        settings = {
            "database_url": outage.database_url,
            "checkpoint_seconds": 0.1,
            # No sweep can be what frees the conversation here.
            "stale_reply_seconds": 600,
            "store_retry_seconds": 60,
        }
        async with start_service(**settings) as service:
            conversation = await service.create_conversation()
            gate = asyncio.Event()
            service.upstream.queue(Reply(tokens=TOKENS, gate=gate))
            async with service.client.stream(
                "POST",
                f"/v1/conversations/{conversation['id']}/messages",
                json={"content": "keep this"},
                headers=service.auth() | {"Accept": "text/event-stream"},
            ) as response:
                events = read_events(response)
                start = await anext(events)
                reply_id = start.data["assistant_message"]["id"]
                assert (await anext(events)).data == {"content": "Stored"}
                await outage.begin(service)
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="chatbot"):
                    gate.set()
                    # The reply has ended and nothing can store it: it is kept, the stream open.
                    await asyncio.sleep(1.5)
                    assert service.running(reply_id) is not None
                    await outage.end()
                    rest = [event async for event in events]
            said = [record for record in caplog.records if record.name == "chatbot.replies.store"]
            assert len(said) == 1, [record.getMessage() for record in said]  # once, not per try

            done = rest[-1]
            assert done.event == "done", done.data
            assert done.data["assistant_message"]["status"] == "completed"
            assert done.data["assistant_message"]["content"] == "".join(TOKENS)
            stored = await read_stored(outage.database_url, conversation["id"])
            assert stored.replies[-1].content == "".join(TOKENS)
            assert stored.replies[-1].latency_ms is not None
            assert stored.conversation.active_reply_id is None

            # The conversation takes the next turn at once: no sweep freed it.
            service.upstream.queue(Reply(tokens=["Next"]))
            again = await service.send(conversation["id"], "and now?")
            assert again.status_code == 201, again.text
            assert again.json()["assistant_message"]["content"] == "Next"


async def test_after_an_outage_no_reply_is_swept_before_its_producer_could_mark_it_alive(
    start_service: Any, database_url: str, tmp_path: Path
) -> None:
    async with DatabaseOutage(database_url, tmp_path) as outage:
        settings = {
            "database_url": outage.database_url,
            "checkpoint_seconds": 0.05,
            "stale_reply_seconds": 1,
        }
        async with start_service(**settings) as service:
            conversation = await service.create_conversation()
            # A reply another instance produces: it marked it alive just now.
            reply_id = await seed_running_reply(
                service.state.sessionmaker,
                uuid.UUID(conversation["id"]),
                content="Half",
                checkpoint_at=utcnow(),
            )
            await outage.begin(service)
            await asyncio.sleep(1.5)  # longer than a reply may go unmarked
            await outage.end()
            # Every instance's producers were cut off as long: none could mark its replies
            # alive, and none is swept for that before the stale period has passed again.
            await asyncio.sleep(0.6)
            assert (await service.stored_message(reply_id)).status is MessageStatus.IN_PROGRESS
            # Past it, a reply nobody marked is abandoned (the sweep still does its work).
            await eventually(
                lambda: _status_is(service, reply_id, MessageStatus.INCOMPLETE), seconds=5
            )


async def _status_is(service: Service, reply_id: uuid.UUID, status: MessageStatus) -> bool:
    return (await service.stored_message(reply_id)).status is status


async def test_only_failures_of_reach_are_retried(
    sessionmaker: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    """A store is retried while the database cannot be reached or cannot take the work yet;
    a statement the database refuses for what it says is not, however often it is tried."""

    async def failure(statement: str) -> BaseException:
        async with sessionmaker() as session:
            try:
                await session.execute(text(statement))
            except Exception as exc:
                return exc
        raise AssertionError(f"{statement} did not fail")

    assert not is_unreachable(await failure("SELECT * FROM no_such_table"))
    assert not is_unreachable(await failure("SELECT FROM WHERE"))
    if make_url(database_url).get_backend_name() == "postgresql":
        assert not is_unreachable(await failure("SELECT 1/0"))
        # The server ends this session, as a restart or an operator would.
        assert is_unreachable(await failure("SELECT pg_terminate_backend(pg_backend_pid())"))
        refused = create_engine(make_url(database_url).set(port=free_port()).render_as_string())
    else:
        refused = create_engine("sqlite+aiosqlite:///" + "/no/such/folder/chatbot.db")
    try:
        with pytest.raises(Exception) as refusal:
            async with refused.connect() as connection:
                await connection.execute(text("SELECT 1"))
        assert is_unreachable(refusal.value)
    finally:
        await refused.dispose()


async def test_the_sweep_spares_a_reply_marked_alive_after_it_was_found_stale(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    conversation_id = uuid.uuid4()
    async with sessionmaker() as session:
        session.add(Conversation(id=conversation_id, user_id="alice", metadata_={}))
        await session.commit()
    reply_id = await seed_running_reply(
        sessionmaker,
        conversation_id,
        content="Half",
        checkpoint_at=utcnow() - timedelta(minutes=5),
    )
    stale_before = utcnow() - timedelta(seconds=30)
    async with sessionmaker() as session:
        found = await replies.stale(session, stale_before)
    assert found == [reply_id]
    async with sessionmaker() as session:  # its producer marks it alive meanwhile
        await replies.mark_alive(session, [reply_id], utcnow())
        await session.commit()
    async with sessionmaker() as session:
        ended = await replies.abandon(
            session, found, stale_before=stale_before, error={"code": "interrupted"}, now=utcnow()
        )
        await session.commit()
    assert ended == []
    async with sessionmaker() as session:
        row = await session.get(Message, reply_id)
    assert row is not None
    assert row.status is MessageStatus.IN_PROGRESS


async def test_a_network_partition_answers_503_within_a_bound_not_never(
    database_url: str, start_service: Any, tmp_path: Any
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a network partition is a PostgreSQL matter")
    async with DatabaseOutage(database_url, tmp_path) as outage:
        settings = {
            "database_url": outage.database_url,
            "db_connect_timeout": 1,
            "db_statement_timeout": 2,
            "db_pool_timeout": 2,
        }
        async with start_service(**settings) as service:
            conversation = await service.create_conversation()
            outage.partition()  # connections stay open and carry nothing, as do new ones

            async def timed(request: Any) -> tuple[float, int]:
                started = time.monotonic()
                response = await request
                return time.monotonic() - started, response.status_code

            readiness = await timed(service.client.get("/readyz", timeout=30))
            requests = [
                lambda: service.client.get("/v1/conversations", headers=service.auth(), timeout=60),
                lambda: service.client.post(
                    "/v1/conversations", json={"title": "t"}, headers=service.auth(), timeout=60
                ),
                lambda: service.send(conversation["id"], "hello?"),
            ]
            answers = await asyncio.gather(*(timed(requests[index % 3]()) for index in range(40)))

    assert readiness[1] == 503
    assert readiness[0] < 3.5
    assert {status for _, status in answers} <= {503}, answers
    # Pool wait, connect and one statement, bounded; the client waited up to 60 s.
    assert max(took for took, _ in answers) < 15, answers
