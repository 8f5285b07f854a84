"""Context that fits: token budgets, whole turns, rolling summaries, titles, prompt profiles."""

import asyncio
import hashlib
import json
import logging
import time
import uuid
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import event, update

from chatbot.context.builder import ContextBuilder, ContextTooLarge
from chatbot.context.chores import TITLE_MAX_TOKENS, clean_title, fallback_title
from chatbot.context.tokens import (
    FALLBACK_ENCODING,
    REPLY_PRIMING_TOKENS,
    TokenCounter,
    encoding_name_for,
)
from chatbot.conversations.models import Conversation
from chatbot.messages.models import Message, MessageStatus, Role
from tests.fake_upstream import Reply
from tests.support import Service, seed_history

COUNTER = TokenCounter()
MODEL = "gpt-4o-mini"


def _prompt_tokens(sent: list[dict[str, Any]]) -> int:
    """Tokens of a request as the budget counts them, recomputed from what the upstream got."""
    total = REPLY_PRIMING_TOKENS
    for message in sent:
        total += COUNTER.count_message(message["content"], MODEL)
        if message.get("tool_calls"):
            total += COUNTER.count_text(json.dumps(message["tool_calls"]), MODEL)
    return total


async def _turn(
    service: Service, conversation_id: str, content: str, **extra: Any
) -> httpx.Response:
    """A turn answered as JSON, once the chores it left (title, summary) are done."""
    response = await service.send(conversation_id, content, **extra)
    await service.state.chores.idle()
    return response


def _sentence(index: int) -> str:
    return f"Message {index}: " + " ".join(f"word{index}x{n}" for n in range(20))


def test_token_counts_work_offline_with_a_stated_fallback() -> None:
    assert COUNTER.count_text("tiktoken is great!", "gpt-4") == 6
    assert COUNTER.encoder_for("gpt-4").name == "cl100k_base"
    assert COUNTER.encoder_for("gpt-4o").name == "o200k_base"
    assert encoding_name_for("llama3.1:8b") == FALLBACK_ENCODING
    assert COUNTER.count_message("", MODEL) == 4


async def test_requests_stay_within_the_budget_and_keep_whole_turns(start_service: Any) -> None:
    async with start_service(context_tokens=400) as service:
        conversation = await service.create_conversation(system_prompt="Be brief.")
        service.upstream.default = Reply(tokens=["Sure", ", ", "noted", "."] * 5)
        for index in range(12):
            response = await _turn(service, conversation["id"], _sentence(index))
            assert response.status_code == 201, response.text

        for index, request in enumerate(service.upstream.requests):
            sent = request.body["messages"]
            assert _prompt_tokens(sent) <= 400
            assert sent[0] == {"role": "system", "content": "Be brief."}
            assert sent[-1] == {"role": "user", "content": _sentence(index)}
            history = [m for m in sent[1:-1] if not m["content"].startswith("Summary of")]
            # Whole turns: user, assistant, user, assistant...
            assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
        # Late turns had to drop early ones.
        assert _sentence(0) not in json.dumps(service.upstream.requests[-1].body)


async def test_a_message_larger_than_the_budget_is_413_before_anything_happens(
    start_service: Any,
) -> None:
    async with start_service(context_tokens=300) as service:
        conversation = await service.create_conversation()
        response = await _turn(service, conversation["id"], "word " * 400)
        assert response.status_code == 413
        assert response.json()["code"] == "context_too_large"
        assert service.upstream.requests == []
        assert await service.messages(conversation["id"]) == []
        # The conversation is not left locked.
        assert (await _turn(service, conversation["id"], "short")).status_code == 201


TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "add_task", "arguments": json.dumps({"title": "milk"})},
}
TOOL_HISTORY = [
    (Role.USER, "add milk to my list", None, None),
    (Role.ASSISTANT, "", [TOOL_CALL], None),
    (Role.TOOL, '{"ok": true, "task": "milk"}', None, "call_1"),
    (Role.ASSISTANT, "Added milk to your list.", None, None),
    (Role.USER, "and eggs " * 10, None, None),
    (Role.ASSISTANT, "Added eggs too. " * 5, None, None),
]


async def test_tool_calls_travel_with_their_results(start_service: Any) -> None:
    async with start_service() as service:
        state = service.state
        conversation = await service.create_conversation()
        conversation_id = uuid.UUID(conversation["id"])
        async with state.sessionmaker() as session:
            session.add_all(
                Message(
                    conversation_id=conversation_id,
                    seq=seq,
                    role=role,
                    content=content,
                    tool_calls=tool_calls,
                    tool_call_id=tool_call_id,
                    token_count=COUNTER.count_text(content, MODEL),
                    status=MessageStatus.COMPLETED,
                )
                for seq, (role, content, tool_calls, tool_call_id) in enumerate(TOOL_HISTORY, 1)
            )
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(message_count=len(TOOL_HISTORY))
            )
            await session.commit()

        # Whatever the budget, the call and its result are sent together or not at all.
        seen = set()
        for budget in range(60, 400, 5):
            builder = ContextBuilder(
                service.settings.model_copy(update={"context_tokens": budget}),
                COUNTER,
                state.profiles,
            )
            async with state.sessionmaker() as session:
                row = await session.get(Conversation, conversation_id)
                assert row is not None
                try:
                    plan = await builder.plan(
                        session, row, before_seq=7, new_content="what is on it?", model=MODEL
                    )
                except ContextTooLarge:
                    continue
            assert plan.total_tokens <= budget
            roles = [m.role for m in plan.messages]
            has_call = any(m.tool_calls for m in plan.messages)
            has_result = Role.TOOL.value in roles
            assert has_call == has_result
            assert plan.messages[1].role in ("user", "system") or len(plan.messages) == 2
            seen.add(len(plan.history))
        assert seen == {0, 2, 6}  # none, the last turn, or both whole turns

        # On the wire the call and its result keep the Chat Completions shape.
        await _turn(service, conversation["id"], "what is on it?")
        sent = service.upstream.requests[-1].body["messages"]
        assert sent[2] == {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}
        assert sent[3]["role"] == "tool"
        assert sent[3]["tool_call_id"] == "call_1"


async def test_a_summary_covers_exactly_the_evicted_messages(start_service: Any) -> None:
    async with start_service(context_tokens=350) as service:
        conversation = await service.create_conversation()
        service.upstream.utility_default = Reply(tokens=["The", " user", " counted", " words."])
        for index in range(8):
            service.upstream.queue(Reply(tokens=[f"Answer {index}", " noted."]))
            await _turn(service, conversation["id"], _sentence(index))
        context = (
            await service.client.get(
                f"/v1/conversations/{conversation['id']}/context", headers=service.auth()
            )
        ).json()
        summary = context["summary"]
        assert summary is not None
        assert summary["content"] == "The user counted words."
        covered = summary["covers"]["to_seq"]
        assert context["messages"][0]["seq"] == covered + 1
        assert context["omitted_messages"] == 0
        assert context["total_tokens"] <= context["budget"]

        # What the summaries were asked to cover is exactly messages 1..covered.
        summarised = "\n".join(
            request.body["messages"][1]["content"]
            for request in service.upstream.utility_requests
            if "Earlier summary" in request.body["messages"][1]["content"]
        )
        stored = await service.messages(conversation["id"])
        for message in stored:
            inside = f"{message['role']}: {message['content']}" in summarised
            assert inside == (message_seq(stored, message) <= covered), message["content"]

        # And the next turn sends the summary as a system message right after the prompt.
        await _turn(service, conversation["id"], "and now?")
        sent = service.upstream.requests[-1].body["messages"]
        assert sent[1]["role"] == "system"
        assert sent[1]["content"].endswith("The user counted words.")


def message_seq(stored: list[dict[str, Any]], message: dict[str, Any]) -> int:
    return stored.index(message) + 1


async def test_a_failed_summary_is_retried_and_never_blocks_a_reply(
    start_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chatbot.context.chores")
    async with start_service(context_tokens=350, chore_backoff_seconds=0.2) as service:
        conversation = await service.create_conversation()
        service.upstream.utility_default = Reply(status=500)
        for index in range(6):
            response = await _turn(service, conversation["id"], _sentence(index))
            assert response.status_code == 201
            await asyncio.sleep(0.25)  # past the first backoff: each turn tries again
        # Said once for the streak, not once per turn; tried again with backoff in between.
        assert caplog.text.count("failed for conversation") == 1
        tries = len(service.upstream.utility_requests)
        assert 2 <= tries <= 5  # a title, then fewer summaries than turns
        context_url = f"/v1/conversations/{conversation['id']}/context"
        before = (await service.client.get(context_url, headers=service.auth())).json()
        assert before["summary"] is None
        assert before["omitted_messages"] > 0

        service.upstream.utility_default = Reply(tokens=["Recovered", " summary"])
        await asyncio.sleep(3.5)  # the backoff has grown to 3.2 s by the sixth failure
        await _turn(service, conversation["id"], "one more")
        after = (await service.client.get(context_url, headers=service.auth())).json()
        assert after["summary"]["content"] == "Recovered summary"
        assert after["omitted_messages"] == 0
        assert after["messages"][0]["seq"] == after["summary"]["covers"]["to_seq"] + 1


async def test_title_after_the_first_exchange_never_overwrites_the_user(service: Service) -> None:
    conversation = await service.create_conversation()
    url = f"/v1/conversations/{conversation['id']}"
    await _turn(service, conversation["id"], "What is the capital of Portugal?")
    titled = (await service.client.get(url, headers=service.auth())).json()
    assert titled["title"] == "A fine title"
    title_request = service.upstream.utility_requests[0].body["messages"]
    assert "What is the capital of Portugal?" in title_request[1]["content"]

    await service.client.patch(url, json={"title": "Mine"}, headers=service.auth())
    await service.client.patch(url, json={"title": None}, headers=service.auth())
    await service.client.patch(url, json={"title": "Mine again"}, headers=service.auth())
    await _turn(service, conversation["id"], "And of Spain?")
    assert (await service.client.get(url, headers=service.auth())).json()["title"] == "Mine again"

    named = await service.create_conversation(title="Named by me")
    await _turn(service, named["id"], "hello")
    assert (
        await service.client.get(f"/v1/conversations/{named['id']}", headers=service.auth())
    ).json()["title"] == "Named by me"


async def test_without_the_utility_model_the_first_message_is_the_title(service: Service) -> None:
    service.upstream.utility_default = Reply(status=503)
    conversation = await service.create_conversation()
    long_question = "Could you please explain how photosynthesis works in desert plants at night"
    await _turn(service, conversation["id"], long_question)
    title = (
        await service.client.get(f"/v1/conversations/{conversation['id']}", headers=service.auth())
    ).json()["title"]
    assert title == "Could you please explain how photosynthesis…"


async def test_titles_are_six_words_and_chores_are_bounded(service: Service) -> None:
    # A small model that answers the user instead of naming the conversation, at length.
    service.upstream.utility_default = Reply(
        tokens=[
            "\"Santos de Lis! I'm glad you found me.",
            " In Lisbon, the capital",
            "...\n",
            "More",
        ]
    )
    conversation = await service.create_conversation()
    await _turn(service, conversation["id"], "I am Santos de Lis, from Lisbon")
    url = f"/v1/conversations/{conversation['id']}"
    title = (await service.client.get(url, headers=service.auth())).json()["title"]
    assert title == "Santos de Lis! I'm glad you"
    (title_request,) = service.upstream.utility_requests
    assert title_request.body["max_tokens"] == TITLE_MAX_TOKENS
    assert clean_title("Title: **Trip to Lisbon.**") == "Trip to Lisbon"
    assert clean_title("A\nB") == "A"
    assert fallback_title("x" * 300) == "x" * 80 + "…"


async def test_a_summary_is_planned_with_the_tools_the_turns_offer(start_service: Any) -> None:
    # The task list's definitions take most of this budget: counted without them, nothing
    # would ever seem to fall out of the context, and no summary would be written.
    async with start_service(context_tokens=1200) as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.utility_default = Reply(tokens=["The", " user", " counted", " words."])
        for index in range(10):
            service.upstream.queue(Reply(tokens=[f"Answer {index}", " noted."]))
            response = await _turn(service, conversation["id"], _sentence(index))
            assert response.status_code == 201, response.text
            assert "tools" in service.upstream.requests[-1].body
        url = f"/v1/conversations/{conversation['id']}/context"
        context = (await service.client.get(url, headers=service.auth())).json()
        assert context["summary"]["content"] == "The user counted words."
        assert context["total_tokens"] <= context["budget"]
        summaries = [
            request.body
            for request in service.upstream.utility_requests
            if "Earlier summary" in request.body["messages"][1]["content"]
        ]
        assert summaries
        assert all(body["max_tokens"] == 250 * 2 + 64 for body in summaries)


async def test_prompt_profiles_choose_the_system_prompt(service: Service) -> None:
    profiles = (await service.client.get("/v1/prompts", headers=service.auth())).json()
    names = [profile["name"] for profile in profiles["data"]]
    assert {"assistant", "concise", "tutor"} <= set(names)
    concise = next(p for p in profiles["data"] if p["name"] == "concise")["system_prompt"]

    conversation = await service.create_conversation(prompt_profile="concise")
    assert conversation["prompt_profile"] == "concise"
    await _turn(service, conversation["id"], "hi")
    assert service.upstream.requests[-1].body["messages"][0]["content"] == concise

    missing = await service.client.post(
        "/v1/conversations", json={"prompt_profile": "nope"}, headers=service.auth()
    )
    assert missing.status_code == 422
    assert missing.json()["code"] == "unknown_prompt_profile"
    chat = await service.client.post(
        "/v1/chat", json={"message": "hi", "prompt_profile": "nope"}, headers=service.auth()
    )
    assert chat.status_code == 422


async def test_each_reply_records_its_prompt_size_and_hash(service: Service) -> None:
    conversation = await service.create_conversation()
    await _turn(service, conversation["id"], "first")
    response = await _turn(service, conversation["id"], "second")
    reply = response.json()["assistant_message"]
    sent = service.upstream.requests[-1].body
    canonical = json.dumps(
        {"model": sent["model"], "messages": sent["messages"]},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert reply["prompt_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert reply["prompt_token_count"] == _prompt_tokens(sent["messages"])
    assert reply["token_count"] == COUNTER.count_text("Hello, world!", MODEL)
    user = (await service.messages(conversation["id"]))[-2]
    assert user["token_count"] == COUNTER.count_text("second", MODEL)


async def test_building_a_context_reads_the_same_whatever_the_history(
    start_service: Any,
) -> None:
    async with start_service(history_messages=20) as service:
        state = service.state
        short = await service.create_conversation()
        long = await service.create_conversation()
        await seed_history(state.sessionmaker, uuid.UUID(short["id"]), 10)
        await seed_history(state.sessionmaker, uuid.UUID(long["id"]), 3000)

        async def rows_read(conversation_id: str) -> tuple[int, int]:
            statements: list[str] = []
            rows = 0

            def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
                statements.append(statement)

            engine = state.engine.sync_engine
            event.listen(engine, "before_cursor_execute", count)
            try:
                response = await service.client.get(
                    f"/v1/conversations/{conversation_id}/context", headers=service.auth()
                )
            finally:
                event.remove(engine, "before_cursor_execute", count)
            rows = len(response.json()["messages"])
            return sum("FROM messages" in s for s in statements), rows

        short_queries, short_rows = await rows_read(short["id"])
        long_queries, long_rows = await rows_read(long["id"])
        assert short_rows == 10
        assert long_rows == 20
        assert long_queries == short_queries == 1


async def test_chores_run_only_when_a_turn_leaves_something_to_do(start_service: Any) -> None:
    async with start_service(context_tokens=400) as service:
        chores = service.state.chores
        started: list[uuid.UUID] = []
        run = chores.run

        async def counted(conversation_id: uuid.UUID) -> None:
            started.append(conversation_id)
            await run(conversation_id)

        chores.run = counted
        conversation = await service.create_conversation()
        await _turn(service, conversation["id"], "first")
        assert len(started) == 1  # the title
        assert len(service.upstream.utility_requests) == 1
        for text in ("second", "third"):
            await _turn(service, conversation["id"], text)
        assert len(started) == 1, "a titled conversation far inside its budget has no chores"
        # Near the budget, the turn that will push messages out starts the summary.
        service.upstream.default = Reply(tokens=["word "] * 150)
        for text in ("fourth", "fifth", "sixth"):
            await _turn(service, conversation["id"], text)
        assert len(started) >= 2
        assert any(
            "summar" in json.dumps(request.body).lower()
            for request in service.upstream.utility_requests[1:]
        )


async def test_a_message_larger_than_a_summary_reads_is_summarised_from_what_fits(
    start_service: Any,
) -> None:
    async with start_service(context_tokens=4000) as service:
        conversation = await service.create_conversation()
        service.upstream.utility_default = Reply(tokens=["A", " very", " long", " answer."])
        service.upstream.queue(Reply(tokens=["lorem ipsum " * 100] * 250))  # 300,000 characters
        await _turn(service, conversation["id"], "write me a book")
        for index in range(3):
            await _turn(service, conversation["id"], _sentence(index))
        context_url = f"/v1/conversations/{conversation['id']}/context"
        context = (await service.client.get(context_url, headers=service.auth())).json()
    assert context["summary"]["content"] == "A very long answer."
    summaries = [
        request.body["messages"][1]["content"]
        for request in service.upstream.utility_requests
        if "Earlier summary" in request.body["messages"][1]["content"]
    ]
    assert summaries
    assert all(len(text) < 60_000 for text in summaries)
    assert any("characters left out" in text for text in summaries)


def test_a_long_streak_of_failing_chores_backs_off_at_most_an_hour() -> None:
    from chatbot.config import Settings
    from chatbot.context.chores import Chores

    settings = Settings(_env_file=None, chore_backoff_seconds=0)
    chores = Chores(settings, cast(Any, None), cast(Any, None), None, cast(Any, None))
    conversation_id = uuid.uuid4()
    for _ in range(3_000):  # 2 ** 3000 would overflow a float
        chores._failed(conversation_id, "summarize", RuntimeError("boom"))
    streak, _ = chores._failing[conversation_id]
    assert streak == 3_000
    settings = Settings(_env_file=None, chore_backoff_seconds=30)
    chores = Chores(settings, cast(Any, None), cast(Any, None), None, cast(Any, None))
    for _ in range(3_000):
        chores._failed(conversation_id, "summarize", RuntimeError("boom"))
    assert chores._failing[conversation_id][1] - time.monotonic() <= 3600
