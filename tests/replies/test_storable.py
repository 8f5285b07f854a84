"""Whatever the upstream sends can be stored: text is made valid where it enters, numbers are
checked, and a field that still cannot be stored costs that field, never the text; one reply
that cannot be saved never holds another's checkpoints back."""

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chatbot.app import create_app
from chatbot.context.tokens import TokenCounter
from chatbot.llm.client import Completion, CompletionRequest, StreamEvent, TextDelta
from chatbot.messages.models import MessageStatus
from chatbot.sanitize import MAX_COUNT
from tests.fake_upstream import Reply
from tests.support import LiveServer, Service, eventually, final_reply, streamed_text

LONE = "\ud800"
"""What the JSON escape `\\ud800` decodes to: half of a UTF-16 pair, no character at all."""


async def test_a_lone_surrogate_costs_one_character_while_another_reply_keeps_checkpointing(
    start_service: Any,
) -> None:
    async with start_service(checkpoint_seconds=0.05) as service:
        # Bob's long reply runs first and keeps running while Alice's arrives.
        long_tokens = [f" word{index}" for index in range(40)]
        service.upstream.queue(Reply(tokens=long_tokens, token_delay=0.04))
        bobs = await service.create_conversation("bob")
        started = await service.send(bobs["id"], "talk for a while", user="bob", background=True)
        assert started.status_code == 202
        bobs_reply = started.json()["assistant_message"]["id"]
        await eventually(lambda: service.upstream.requests)

        # The fake upstream writes these as the JSON escapes `\ud800`, `\ud83d`, `\u0000`.
        service.upstream.queue(
            Reply(tokens=["Good", LONE, " morning", "\ud83d", "\ude00", "\x00", "!"])
        )
        alices = await service.create_conversation()
        events = await service.stream(alices["id"], "hello")

        assert events[-1].event == "done", events[-1].data
        expected = "Good\ufffd morning\ufffd\ufffd\ufffd!"
        assert streamed_text(events) == expected
        assert events[-1].data["assistant_message"]["content"] == expected
        stored = (await service.messages(alices["id"]))[-1]
        assert (stored["status"], stored["content"]) == ("completed", expected)

        # Meanwhile Bob's text kept reaching the database, checkpoint after checkpoint.
        seen: set[str] = set()

        async def grown_twice() -> bool:
            row = await service.stored_message(bobs_reply)
            if row.status is MessageStatus.IN_PROGRESS and row.content:
                seen.add(row.content)
            return len(seen) >= 2

        await eventually(grown_twice, seconds=5)
        assert max(map(len, seen)) > min(map(len, seen))
        reply = await final_reply(service, bobs["id"], user="bob")
        assert (reply["status"], reply["content"]) == ("completed", "".join(long_tokens))


@pytest.mark.parametrize(
    ("numbers", "usage"),
    [
        (
            {"prompt_tokens": 10**20, "completion_tokens": 10**20, "total_tokens": 10**20},
            {"prompt_tokens": MAX_COUNT, "completion_tokens": MAX_COUNT, "total_tokens": MAX_COUNT},
        ),
        (
            {"prompt_tokens": 2**31, "completion_tokens": 5, "total_tokens": 2**31 + 5},
            {"prompt_tokens": MAX_COUNT, "completion_tokens": 5, "total_tokens": MAX_COUNT},
        ),
        (
            {"prompt_tokens": 7, "completion_tokens": 3.0},
            {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        ),
        (
            {"completion_tokens": 4, "total_tokens": 9, "prompt_tokens": None},
            {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 9},
        ),
        ({"prompt_tokens": "many", "completion_tokens": 3, "total_tokens": 3}, None),
        ({"prompt_tokens": math.nan, "completion_tokens": 3, "total_tokens": 3}, None),
        ({"prompt_tokens": -1, "completion_tokens": 3, "total_tokens": 2}, None),
        ({"prompt_tokens": True, "completion_tokens": 1.5, "total_tokens": 3}, None),
        ({"prompt_tokens": {"nested": 1}, "completion_tokens": [3]}, None),
    ],
    ids=[
        "1e20",
        "2^31",
        "whole-float",
        "left-out",
        "text",
        "nan",
        "negative",
        "bool-and-fraction",
        "shapes",
    ],
)
async def test_usage_numbers_of_any_size_or_shape_keep_the_text(
    service: Service, numbers: dict[str, Any], usage: dict[str, Any] | None
) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["All", " of", " it"], usage_numbers=numbers))
    response = await service.send(conversation["id"], "count")
    assert response.status_code == 201, response.text
    reply = response.json()["assistant_message"]
    assert (reply["status"], reply["content"]) == ("completed", "All of it")
    if usage is None:
        # Numbers that are no counts are no usage: the service's own count stands in.
        completion = TokenCounter().count_text("All of it", "gpt-4o-mini")
        prompt = reply["prompt_token_count"]
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        usage |= {"total_tokens": prompt + completion, "estimated": True}
    else:
        usage = {**usage, "estimated": False}
    assert reply["usage"] == usage
    assert (await service.messages(conversation["id"]))[-1] == reply


class _UncleanModel:
    """A model client that hands text on as it got it, as one that skipped the cleaning at
    the door would: the checkpoint and the final store must still cope. Each request gets the
    next script; every reply waits at the gate after its first piece."""

    def __init__(self, scripts: list[list[str]], gate: asyncio.Event) -> None:
        self._scripts = scripts
        self._gate = gate

    def model_label(self, requested: str) -> str:
        return requested

    def takes_tools(self, model: str) -> bool:
        return True

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        script = self._scripts.pop(0) if self._scripts else ["A title"]  # then chores ask
        for index, piece in enumerate(script):
            yield TextDelta(piece)
            if index == 0:
                await self._gate.wait()
        yield Completion(finish_reason="stop", usage=None, model="unclean")

    async def aclose(self) -> None:
        pass


async def test_a_reply_that_cannot_be_checkpointed_holds_no_other_back(
    make_settings: Any, upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gate = asyncio.Event()
    model = _UncleanModel([["Bad " + LONE, " end"], ["Good so far", ", and done"]], gate)
    settings = make_settings(checkpoint_seconds=0.05)
    async with (
        LiveServer(create_app(settings, llm=model)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=20) as client,
    ):
        service = Service(server, settings, client, upstream)
        bad = await service.create_conversation()
        good = await service.create_conversation("bob")
        bad_reply = (await service.send(bad["id"], "one", background=True)).json()
        good_reply = (await service.send(good["id"], "two", user="bob", background=True)).json()

        async def both_checkpointed() -> bool:
            saved = [
                await service.stored_message(reply["assistant_message"]["id"])
                for reply in (bad_reply, good_reply)
            ]
            return [row.content for row in saved] == ["Bad \ufffd", "Good so far"]

        # One statement saving both fails on the bad text; each is then saved on its own.
        await eventually(both_checkpointed, seconds=5)
        gate.set()
        finished = [
            await final_reply(service, bad["id"]),
            await final_reply(service, good["id"], user="bob"),
        ]
        assert [(reply["status"], reply["content"]) for reply in finished] == [
            ("completed", "Bad \ufffd end"),
            ("completed", "Good so far, and done"),
        ]
        # The failed statement was logged by kind, without the replies' text in it.
        assert re.search(r"checkpoint of \d replies failed", caplog.text)
        assert "Good so far" not in caplog.text
        assert "Bad " not in caplog.text
