"""The tool loop through whole turns: a fake upstream streams tool calls in fragments, the
service runs them for the conversation's owner, sends the results back and streams the answer;
every step is stored, shown and replayed."""

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from chatbot.app import create_app
from chatbot.config import ConfigError
from chatbot.conversations import repository as conversations
from chatbot.db import utcnow
from chatbot.messages.models import Message, MessageStatus
from chatbot.replies import repository as replies
from chatbot.replies.live import Snapshot
from chatbot.tasks import repository as tasks
from chatbot.tools.base import Tool, ToolContext, Toolset
from tests.fake_upstream import UTILITY_MODEL, Reply
from tests.support import Event, Service, day_usage, eventually, final_reply, read_events

FIXTURE_SERVER = Path(__file__).with_name("mcp_fixture_server.py")


async def _shout(context: ToolContext, arguments: dict[str, Any]) -> Any:
    return {"shouted": arguments["text"].upper(), "for": context.user_id}


SHOUT = Toolset(
    "shout",
    "Loud tools.",
    (
        Tool(
            "shout",
            "Says it loudly.",
            {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            _shout,
        ),
    ),
)
"""A toolset as an operator's own package would define one, for CHATBOT_TOOLSET_IMPORTS."""


def tool_messages(request_body: dict[str, Any]) -> list[dict[str, Any]]:
    return [message for message in request_body["messages"] if message["role"] == "tool"]


def _following(service: Service, reply_id: str, count: int) -> bool:
    """Whether `count` clients follow the running reply live (not from the database)."""
    return (
        service.running(reply_id) is not None
        and service.state.replies.followers(uuid.UUID(reply_id)) == count
    )


def model_requests(service: Service) -> list[dict[str, Any]]:
    return [r.body for r in service.upstream.requests if r.body.get("model") != UTILITY_MODEL]


def shape(events: list[Event]) -> list[tuple[str, Any]]:
    """The stream with neighbouring deltas joined: how deltas are cut is not the contract."""
    joined: list[tuple[str, Any]] = []
    for event in events:
        if event.event == "delta":
            if joined and joined[-1][0] == "text":
                joined[-1] = ("text", joined[-1][1] + event.data["content"])
            else:
                joined.append(("text", event.data["content"]))
        elif event.event in ("tool_call", "tool_result"):
            joined.append((event.event, event.data))
    return joined


def by_position(events: list[Event]) -> dict[int, Any]:
    """What each stream position holds: a character of text, or a tool event. Two streams of
    one reply agree position by position however their deltas were cut."""
    held: dict[int, Any] = {}
    for event in events:
        if event.id is None or event.event not in ("delta", "tool_call", "tool_result"):
            continue
        end = int(event.id.rsplit(":", 1)[1])
        if event.event == "delta":
            text = event.data["content"]
            for offset, char in enumerate(text):
                held[end - len(text) + 1 + offset] = char
        else:
            held[end] = (event.event, event.data)
    return held


async def test_streamed_tool_calls_run_and_the_answer_streams_after_them(
    start_service: Any, sessionmaker: Any
) -> None:
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(
            Reply(
                tokens=["I'll", " add", " both."],
                tool_calls=[
                    ("call_a", "add_task", '{"title": "buy milk", "due_date": "2026-12-01"}'),
                    ("call_b", "add_task", '{"title": "call mom"}'),
                ],
                fragment_size=3,
            ),
            Reply(tokens=["Added", " both", " tasks."]),
        )
        events = await service.stream(conversation["id"], "add milk and mom")

        kinds = [event.event for event in events]
        assert kinds[0] == "start"
        assert kinds[-1] == "done"
        steps = shape(events)
        assert steps[0] == ("text", "I'll add both.")
        assert [kind for kind, _ in steps[1:5]] == ["tool_call"] * 2 + ["tool_result"] * 2
        assert steps[1][1] == {
            "id": "call_a",
            "name": "add_task",
            "arguments": '{"title": "buy milk", "due_date": "2026-12-01"}',
        }
        results = [data for kind, data in steps if kind == "tool_result"]
        assert [(r["call_id"], r["name"], r["status"]) for r in results] == [
            ("call_a", "add_task", "ok"),
            ("call_b", "add_task", "ok"),
        ]
        assert json.loads(results[0]["result"])["title"] == "buy milk"
        assert steps[5:] == [("text", "Added both tasks.")]
        # Event ids are positions: unique, increasing, and tool events take one each.
        positions = [int(event.id.rsplit(":", 1)[1]) for event in events if event.id]
        assert positions == sorted(set(positions))

        # The results went back to the model, after the call that asked for them.
        first, second = model_requests(service)
        assert {tool["function"]["name"] for tool in first["tools"]} >= {"add_task", "list_tasks"}
        calling = second["messages"][-3]
        assert calling["role"] == "assistant"
        assert calling["content"] == "I'll add both."
        assert [call["id"] for call in calling["tool_calls"]] == ["call_a", "call_b"]
        sent = tool_messages(second)
        assert [message["tool_call_id"] for message in sent] == ["call_a", "call_b"]
        assert json.loads(sent[1]["content"])["title"] == "call mom"

        # Stored in order; usage and the calls summed up on the reply.
        stored = await service.messages(conversation["id"])
        assert [(m["role"], m["tool_call_id"]) for m in stored] == [
            ("user", None),
            ("assistant", None),
            ("tool", "call_a"),
            ("tool", "call_b"),
            ("assistant", None),
        ]
        assert stored[1]["tool_calls"][0]["function"]["name"] == "add_task"
        assert stored[1]["content"] == "I'll add both."
        reply = stored[-1]
        assert reply["content"] == "Added both tasks."
        assert reply["status"] == "completed"
        assert reply["usage"] == {
            "prompt_tokens": 22,
            "completion_tokens": 6,
            "total_tokens": 28,
            "estimated": False,
        }
        assert events[-1].data["assistant_message"]["id"] == reply["id"]
        assert [call["id"] for call in events[-1].data["tool_calls"]] == ["call_a", "call_b"]
        # Each round's tokens counted once in the user's day: 14 for the calls, 14 for the answer.
        assert await day_usage(sessionmaker, "alice") == 28

        # Replayed from the database: the same thing at every position, then the same end.
        replayed = await service.follow(reply["id"])
        assert by_position(replayed) == by_position(events)
        assert replayed[-1].data == events[-1].data
        conversation = (
            await service.client.get(
                f"/v1/conversations/{conversation['id']}", headers=service.auth()
            )
        ).json()
        assert conversation["message_count"] == 5


async def test_a_resumed_stream_replays_the_tool_events_live_and_stored(
    start_service: Any,
) -> None:
    gate = asyncio.Event()
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(
            Reply(tokens=["On", " it."], tool_calls=[("call_1", "add_task", '{"title": "x"}')]),
            Reply(tokens=["Done", " now", " really"], gate=gate),
        )
        response = await service.send(conversation["id"], "add x", background=True)
        reply_id = response.json()["assistant_message"]["id"]
        url = f"/v1/messages/{reply_id}/stream"

        # Live: the reply waits on the gate after its first answer token.
        async with service.client.stream("GET", url, headers=service.auth()) as stream:
            live: list[Event] = []
            async for event in read_events(stream):
                live.append(event)
                if event.event == "delta" and event.data["content"] == "Done":
                    break
        assert [kind for kind, _ in shape(live)] == ["text", "tool_call", "tool_result", "text"]
        await eventually(lambda: _following(service, reply_id, 0))
        resumed_live = asyncio.create_task(
            service.follow(reply_id, after=3)
        )  # after "On " and a bit
        # Open the gate only once the resumed stream follows the running reply.
        await eventually(lambda: _following(service, reply_id, 1))
        gate.set()
        resumed = await resumed_live
        assert shape(resumed)[0] == ("text", "it.")
        assert [kind for kind, _ in shape(resumed)[1:3]] == ["tool_call", "tool_result"]
        assert shape(resumed)[3] == ("text", "Done now really")

        full = await service.follow(reply_id, after=0)
        call_event = next(e for e in full if e.event == "tool_call")
        assert call_event.id is not None
        position = int(call_event.id.rsplit(":", 1)[1])
        # Stored: from the database, the same events at the same positions.
        stored_tail = await service.follow(reply_id, after=position)
        assert shape(stored_tail) == shape(full)[2:]
        assert next(e.id for e in stored_tail if e.event != "done") == f"{reply_id}:{position + 1}"
        assert full[-1].event == "done"
        assert [c["id"] for c in full[-1].data["tool_calls"]] == ["call_1"]


async def test_invalid_arguments_and_a_failing_tool_reach_the_model_as_errors(
    start_service: Any,
) -> None:
    async def broken(context: ToolContext, arguments: dict[str, Any]) -> Any:
        raise RuntimeError("disk on fire at /secret/path")

    flaky = Toolset("flaky", "Tools that fail.", (Tool("explode", "Fails.", {}, broken),))
    async with start_service(toolsets=[flaky]) as service:
        conversation = await service.create_conversation(toolsets=["tasks", "flaky"])
        service.upstream.queue(
            Reply(
                tokens=[],
                tool_calls=[
                    ("c1", "add_task", '{"title": 42}'),
                    ("c2", "explode", "{}"),
                    ("c3", "add_task", '{"title": "ok", "notes": '),  # cut-off JSON
                    ("c4", "no_such_tool", "{}"),
                ],
            ),
            Reply(tokens=["Sorry", "."]),
        )
        response = await service.send(conversation["id"], "go")
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["assistant_message"]["content"] == "Sorry."
        assert [(c["id"], c["status"]) for c in body["tool_calls"]] == [
            ("c1", "error"),
            ("c2", "error"),
            ("c3", "error"),
            ("c4", "error"),
        ]
        errors = [
            json.loads(m["content"])["error"] for m in tool_messages(model_requests(service)[1])
        ]
        assert errors[0].startswith("invalid arguments: title:")
        assert errors[1] == "the tool failed"  # nothing of the exception leaks
        assert errors[2] == "the arguments are not valid JSON"
        assert errors[3] == "there is no tool named 'no_such_tool'"
        stored = await service.messages(conversation["id"])
        assert [m["error"]["code"] for m in stored if m["role"] == "tool"] == ["tool_error"] * 4


async def test_the_round_limit_holds(start_service: Any) -> None:
    calls = Reply(tokens=[], tool_calls=[("c", "list_tasks", "{}")])
    async with start_service(max_tool_rounds=2) as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        # A model that keeps calling is told to answer after two rounds, and does.
        service.upstream.queue(calls, calls, Reply(tokens=["Nothing", " to", " do."]))
        response = await service.send(conversation["id"], "loop")
        assert response.status_code == 201
        sent = model_requests(service)
        assert [r.get("tool_choice") for r in sent] == [None, None, "none"]
        assert len(response.json()["tool_calls"]) == 2

        # One that calls anyway has no third round run for it.
        service.upstream.requests.clear()
        service.upstream.queue(calls, calls, calls)
        response = await service.send(conversation["id"], "loop again")
        assert response.status_code == 502
        assert response.json()["code"] == "too_many_tool_rounds"
        assert len(model_requests(service)) == 3
        stored = await service.messages(conversation["id"])
        assert sum(1 for m in stored if m["role"] == "tool") == 4
        assert stored[-1]["status"] == "failed"


async def test_a_user_id_the_model_writes_acts_only_for_the_caller(start_service: Any) -> None:
    async with start_service() as service:
        bobs = await service.create_conversation("bob", toolsets=["tasks"])
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("b1", "add_task", '{"title": "bob secret"}')]),
            Reply(tokens=["ok"]),
        )
        await service.stream(bobs["id"], "add", user="bob")
        bob_task = json.loads(tool_messages(model_requests(service)[1])[0]["content"])

        alices = await service.create_conversation(toolsets=["tasks"])
        service.upstream.requests.clear()
        service.upstream.queue(
            Reply(
                tokens=[],
                tool_calls=[
                    ("a1", "list_tasks", '{"user_id": "bob"}'),
                    ("a2", "complete_task", json.dumps({"task_id": bob_task["id"]})),
                    ("a3", "delete_task", json.dumps({"task_id": bob_task["id"]})),
                    ("a4", "list_tasks", "{}"),
                ],
            ),
            Reply(tokens=["done"]),
        )
        await service.stream(alices["id"], "take over bob")
        results = [json.loads(m["content"]) for m in tool_messages(model_requests(service)[1])]
        assert "user_id" in results[0]["error"]  # refused by the schema, not obeyed
        assert "no task with this id" in results[1]["error"]
        assert "no task with this id" in results[2]["error"]
        assert results[3]["tasks"] == []  # alice's list: bob's task is not in it

        # Bob's task is untouched.
        service.upstream.requests.clear()
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("b2", "list_tasks", "{}")]), Reply(tokens=["ok"])
        )
        await service.stream(bobs["id"], "list", user="bob")
        listed = json.loads(tool_messages(model_requests(service)[1])[-1]["content"])
        assert [(t["title"], t["done"]) for t in listed["tasks"]] == [("bob secret", False)]


async def test_a_cancelled_reply_runs_no_further_tool_call(start_service: Any) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def wait(context: ToolContext, arguments: dict[str, Any]) -> Any:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def quick(context: ToolContext, arguments: dict[str, Any]) -> Any:
        return "quick done"

    slow = Toolset(
        "slow",
        "Slow tools.",
        (Tool("wait", "Waits.", {}, wait), Tool("quick", "No wait.", {}, quick)),
    )
    async with start_service(toolsets=[slow]) as service:
        conversation = await service.create_conversation(toolsets=["slow"])
        service.upstream.queue(
            # quick ends first, but its result waits its turn behind the slow call's.
            Reply(tokens=["Waiting"], tool_calls=[("w1", "wait", "{}"), ("q1", "quick", "{}")]),
            Reply(tokens=["never", " sent"]),
        )
        response = await service.send(conversation["id"], "wait", background=True)
        reply_id = response.json()["assistant_message"]["id"]
        live = asyncio.create_task(service.follow(reply_id))
        await asyncio.wait_for(started.wait(), 5)
        await eventually(lambda: _following(service, reply_id, 1))
        cancel = await service.client.post(
            f"/v1/messages/{reply_id}/cancel", headers=service.auth()
        )
        assert cancel.json()["assistant_message"]["status"] == "cancelled"
        assert cancelled.is_set()
        stored = await service.messages(conversation["id"])
        assert [m["role"] for m in stored] == ["user", "assistant", "tool", "tool", "assistant"]
        assert "stopped" in json.loads(stored[2]["content"])["error"]
        assert json.loads(stored[3]["content"]) == "quick done"
        assert len(model_requests(service)) == 1
        # What the live follower saw is what the record replays.
        seen = await asyncio.wait_for(live, 5)
        assert [(kind, data.get("status")) for kind, data in shape(seen)[1:]] == [
            ("tool_call", None),
            ("tool_call", None),
            ("tool_result", "error"),
            ("tool_result", "ok"),
        ]
        replayed = await service.follow(reply_id)
        assert by_position(replayed) == by_position(seen)
        assert replayed[-1].data["tool_calls"] == seen[-1].data["tool_calls"]
        # The conversation can go on: the stored calls have their results for the next prompt.
        service.upstream.queue(Reply(tokens=["Hi"]))
        await service.stream(conversation["id"], "next")
        history = model_requests(service)[-1]["messages"]
        assert [m["role"] for m in history[1:]] == ["user", "assistant", "tool", "tool", "user"]


async def test_ids_repeated_across_rounds_an_empty_answer_and_too_many_calls(
    start_service: Any,
) -> None:
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(
            # Some servers number calls afresh each round; the service keeps ids unique.
            Reply(tokens=[], tool_calls=[("call_0", "list_tasks", "{}")]),
            Reply(tokens=[], tool_calls=[("call_0", "list_tasks", "{}")] * 18),
            Reply(tokens=[]),  # an empty answer after the tools is asked for again
            Reply(tokens=["Fine."]),
        )
        events = await service.stream(conversation["id"], "go")
        done = events[-1].data
        assert done["assistant_message"]["content"] == "Fine."
        ids = [call["id"] for call in done["tool_calls"]]
        assert len(set(ids)) == len(ids) == 19
        assert ids[0] == "call_0"
        assert [call["status"] for call in done["tool_calls"]] == ["ok"] * 17 + ["error"] * 2
        assert "at most 16 calls" in done["tool_calls"][-1]["result"]
        assert len(model_requests(service)) == 4
        replayed = await service.follow(done["assistant_message"]["id"])
        assert replayed[-1].data["tool_calls"] == done["tool_calls"]


async def test_tool_results_that_outgrow_the_context_end_the_reply(start_service: Any) -> None:
    async def big(context: ToolContext, arguments: dict[str, Any]) -> Any:
        return "word " * 2000

    large = Toolset("large", "Large results.", (Tool("big", "Says a lot.", {}, big),))
    async with start_service(toolsets=[large], context_tokens=1500) as service:
        conversation = await service.create_conversation(toolsets=["large"])
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("b1", "big", "{}")]), Reply(tokens=["never"])
        )
        response = await service.send(conversation["id"], "go")
        assert response.status_code == 413
        assert response.json()["code"] == "context_too_large"
        assert len(model_requests(service)) == 1


async def test_tool_rounds_count_against_the_daily_quota(
    start_service: Any, sessionmaker: Any
) -> None:
    # How many tokens the first call's prompt takes, tool definitions included.
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        await service.stream(conversation["id"], "hi")
        prompt = (await final_reply(service, conversation["id"]))["prompt_token_count"]
    # A fresh user's day has room for that prompt, not for the round's 31 tokens on top.
    service.upstream.requests.clear()
    async with start_service(daily_token_quota=prompt + 20) as service:
        conversation = await service.create_conversation("carol", toolsets=["tasks"])
        service.upstream.queue(
            Reply(tokens=["a"] * 20, tool_calls=[("q1", "list_tasks", "{}")]),
            Reply(tokens=["never"]),
        )
        response = await service.send(conversation["id"], "hi", user="carol")
        assert response.status_code == 429
        assert response.json()["code"] == "quota_exceeded"
        assert len(model_requests(service)) == 1
        stored = await service.messages(conversation["id"], "carol")
        roles = [m["role"] for m in stored]
        assert roles == ["user", "assistant", "tool", "assistant"]
        assert await day_usage(sessionmaker, "carol") == 11 + 20  # the round that ran


async def test_which_toolsets_a_conversation_uses_is_part_of_it(start_service: Any) -> None:
    async with start_service(default_toolsets=["tasks"]) as service:
        conversation = await service.create_conversation()
        assert conversation["toolsets"] == ["tasks"]
        none = await service.create_conversation(toolsets=[])
        assert none["toolsets"] == []
        refused = await service.client.post(
            "/v1/conversations", json={"toolsets": ["nope"]}, headers=service.auth()
        )
        assert refused.status_code == 422
        assert refused.json()["code"] == "unknown_toolset"

        # What a turn would send: the tools' definitions count against the budget.
        reports = [
            (
                await service.client.get(
                    f"/v1/conversations/{c['id']}/context", headers=service.auth()
                )
            ).json()
            for c in (conversation, none)
        ]
        assert reports[0]["tools"]["offered"][0] == "add_task"
        assert reports[0]["tools"]["tokens"] > 100
        assert (
            reports[0]["total_tokens"] - reports[1]["total_tokens"] == reports[0]["tools"]["tokens"]
        )
        assert reports[1]["tools"] == {"toolsets": [], "offered": [], "tokens": 0}

        await service.stream(conversation["id"], "hi")
        await service.stream(none["id"], "hi")
        with_tools, without = model_requests(service)
        assert [t["function"]["name"] for t in with_tools["tools"]] == [
            "add_task",
            "list_tasks",
            "complete_task",
            "update_task",
            "delete_task",
        ]
        assert "tools" not in without

        patched = await service.client.patch(
            f"/v1/conversations/{conversation['id']}",
            json={"toolsets": []},
            headers=service.auth(),
        )
        assert patched.json()["toolsets"] == []
        await service.stream(conversation["id"], "again")
        assert "tools" not in model_requests(service)[-1]
        chat = await service.client.post(
            "/v1/chat", json={"message": "hi", "toolsets": ["tasks"]}, headers=service.auth()
        )
        assert "tools" in model_requests(service)[-1]
        got = await service.client.get(
            f"/v1/conversations/{chat.json()['conversation_id']}", headers=service.auth()
        )
        assert got.json()["toolsets"] == ["tasks"]


async def test_an_mcp_server_over_stdio_serves_a_chat_turn(start_service: Any) -> None:
    servers = {
        "fixture": {"command": sys.executable, "args": [str(FIXTURE_SERVER)], "users": ["alice"]}
    }
    async with start_service(mcp_servers=servers) as service:
        conversation = await service.create_conversation(toolsets=["fixture"])
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("m1", "fixture__echo", '{"text": "hello mcp"}')]),
            Reply(tokens=["It", " echoed."]),
        )
        events = await service.stream(conversation["id"], "echo something")
        assert events[-1].event == "done", events[-1].data
        names = {tool["function"]["name"] for tool in model_requests(service)[0]["tools"]}
        assert "fixture__echo" in names
        result = json.loads(tool_messages(model_requests(service)[1])[0]["content"])
        # The server learned who the call is for from the service, not from the model.
        assert result == {"text": "hello mcp", "user_id": "alice"}
        reply = await final_reply(service, conversation["id"])
        assert reply["content"] == "It echoed."
        # A server the operator opened to alice alone is unknown to everyone else.
        refused = await service.client.post(
            "/v1/conversations", json={"toolsets": ["fixture"]}, headers=service.auth("bob")
        )
        assert refused.status_code == 422
        assert "fixture" not in refused.json()["detail"].split(";")[1]


async def test_a_later_turn_sends_the_calls_with_their_results(start_service: Any) -> None:
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("h1", "add_task", '{"title": "milk"}')]),
            Reply(tokens=["Added."]),
            Reply(tokens=["You", " have", " milk."]),
        )
        await service.stream(conversation["id"], "add milk")
        await service.stream(conversation["id"], "what did you do?")
        history = model_requests(service)[-1]["messages"]
        assert [(m["role"], m.get("tool_call_id")) for m in history[1:]] == [
            ("user", None),
            ("assistant", None),
            ("tool", "h1"),
            ("assistant", None),
            ("user", None),
        ]
        assert history[2]["tool_calls"][0]["function"]["name"] == "add_task"


async def test_a_checkpoint_taken_before_a_round_moved_the_reply_writes_nothing(
    start_service: Any, sessionmaker: Any
) -> None:
    release = asyncio.Event()

    async def hold(context: ToolContext, arguments: dict[str, Any]) -> Any:
        await release.wait()
        return "ok"

    held = Toolset("held", "Held.", (Tool("hold", "Holds.", {}, hold),))
    async with start_service(toolsets=[held]) as service:
        conversation = await service.create_conversation(toolsets=["held"])
        service.upstream.queue(
            Reply(tokens=["Round", " one"], tool_calls=[("h1", "hold", "{}")]),
            Reply(tokens=["Round", " two"]),
        )
        response = await service.send(conversation["id"], "go", background=True)
        reply_id = uuid.UUID(response.json()["assistant_message"]["id"])
        generation = service.running(reply_id)
        assert generation is not None
        await eventually(lambda: generation.seq == 4)  # moved past the call and result
        # A snapshot of round one's text, taken at the old position, arrives late.
        async with sessionmaker() as session:
            stale = Snapshot(reply_id, "Round one", length=9, seq=2)
            await replies.save_contents(session, [stale], utcnow())
            await session.commit()
        # Round one's text stays with the call; the reply, read by followers elsewhere, is empty.
        running = (await service.messages(conversation["id"]))[-1]
        assert (running["status"], running["content"]) == ("in_progress", "")
        release.set()
        reply = await final_reply(service, conversation["id"])
        assert reply["content"] == "Round two"
        stored = await service.messages(conversation["id"])
        assert [m["content"] for m in stored if m["role"] == "assistant"] == [
            "Round one",
            "Round two",
        ]


async def test_a_reply_cancelled_elsewhere_runs_no_tools_and_still_counts(
    start_service: Any, sessionmaker: Any
) -> None:
    gate = asyncio.Event()
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(
            Reply(
                tokens=["Adding"], tool_calls=[("e1", "add_task", '{"title": "never"}')], gate=gate
            )
        )
        response = await service.send(conversation["id"], "add never", background=True)
        reply_id = uuid.UUID(response.json()["assistant_message"]["id"])
        generation = service.running(reply_id)
        assert generation is not None
        await eventually(lambda: generation.length > 0)
        # Another instance took the cancel: the row and the conversation say so.
        async with sessionmaker() as session:
            await session.execute(
                update(Message).where(Message.id == reply_id).values(status=MessageStatus.CANCELLED)
            )
            await conversations.release_reply(session, generation.ref.conversation_id, reply_id)
            await session.commit()
        gate.set()  # the model's call ends, asking for a tool
        await eventually(lambda: service.running(reply_id) is None)
        stored = await service.messages(conversation["id"])
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "completed"),
            ("assistant", "cancelled"),
        ]
        async with sessionmaker() as session:
            assert await tasks.list_tasks(session, "alice") == []
        assert await day_usage(sessionmaker, "alice") == 11 + 1  # the call the model made


async def test_a_toolset_named_in_the_settings_is_imported_and_used(start_service: Any) -> None:
    async with start_service(toolset_imports=["tests.tools.test_tool_loop:SHOUT"]) as service:
        conversation = await service.create_conversation(toolsets=["shout"])
        service.upstream.queue(
            Reply(tokens=[], tool_calls=[("s1", "shout", '{"text": "hi"}')]), Reply(tokens=["ok"])
        )
        await service.stream(conversation["id"], "shout hi")
        result = json.loads(tool_messages(model_requests(service)[1])[0]["content"])
        assert result == {"shouted": "HI", "for": "alice"}


def test_a_toolset_import_that_fails_stops_the_start(make_settings: Any) -> None:
    for path, words in (
        ("tests.no_such_module:X", "cannot import"),
        ("tests.tools.test_tool_loop:FIXTURE_SERVER", "is not a Toolset"),
    ):
        with pytest.raises(ConfigError, match=words):
            create_app(make_settings(toolset_imports=[path]))


async def test_a_conversation_that_names_no_toolsets_follows_the_default(
    start_service: Any,
) -> None:
    async with start_service(default_toolsets=["tasks"]) as service:
        conversation = await service.create_conversation()
        assert conversation["toolsets"] == ["tasks"]
    # The operator turns tools off (a model that cannot call them): old conversations follow.
    service.upstream.requests.clear()
    async with start_service(default_toolsets=[]) as service:
        url = f"/v1/conversations/{conversation['id']}"
        assert (await service.client.get(url, headers=service.auth())).json()["toolsets"] == []
        await service.stream(conversation["id"], "hi")
        assert "tools" not in model_requests(service)[-1]
        # Naming them again, and following the default again.
        for toolsets, offered in ((["tasks"], True), (None, False)):
            patched = await service.client.patch(
                url, json={"toolsets": toolsets}, headers=service.auth()
            )
            assert patched.json()["toolsets"] == (toolsets or [])
            await service.stream(conversation["id"], "hi")
            assert ("tools" in model_requests(service)[-1]) is offered


async def test_unset_default_toolsets_offer_a_real_model_no_tools(
    start_service: Any, make_settings: Any
) -> None:
    # Each definition costs every call its tokens; a model is offered tools when asked.
    async with start_service(default_toolsets=None) as service:
        conversation = await service.create_conversation()
        assert conversation["toolsets"] == []
        await service.stream(conversation["id"], "hi")
        assert "tools" not in model_requests(service)[-1]
        chosen = await service.create_conversation(toolsets=["tasks"])
        await service.stream(chosen["id"], "hi")
        assert "add_task" in json.dumps(model_requests(service)[-1]["tools"])
    # The offline demo model keeps its task list, which is what it demonstrates.
    demo = make_settings(openai_api_key=None, openai_base_url=None, default_toolsets=None)
    assert demo.toolsets_by_default == ["tasks"]
    assert make_settings(default_toolsets=None).toolsets_by_default == []


@pytest.mark.parametrize(
    "calls",
    [
        [("c1", "add_task", '{"title": "' + "x" * 300_000 + '"}')],
        [(f"c{index}", "list_tasks", "{}") for index in range(65)],
        [("c1", "n" * 300, "{}")],
    ],
    ids=["300k characters of arguments", "65 calls", "a 300-character name"],
)
async def test_tool_calls_past_their_bounds_fail_the_reply_and_run_nothing(
    start_service: Any, calls: list[tuple[str, str, str]]
) -> None:
    async with start_service() as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        service.upstream.queue(Reply(tokens=[], tool_calls=calls, fragment_size=10_000))
        response = await service.send(conversation["id"], "do a lot")
        assert response.status_code == 502
        assert response.json()["code"] == "upstream_error"
        stored = await service.messages(conversation["id"])
        assert [m["role"] for m in stored] == ["user", "assistant"]
        assert stored[-1]["status"] == "failed"
        service.upstream.queue(Reply(tokens=["Fine."]))
        assert (await service.send(conversation["id"], "then less")).status_code == 201
