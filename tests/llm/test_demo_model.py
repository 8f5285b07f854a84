"""The offline demo model drives the task tools when they are offered, and only then."""

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.llm.client import ChatMessage, Completion, CompletionRequest, TextDelta, ToolCall
from chatbot.llm.demo import DemoChatClient
from chatbot.tasks.models import Task
from chatbot.tasks.tools import TASKS, task_out
from chatbot.tools.base import error_result
from tests.support import model_events, run_task_tool

TOOLS = [tool.to_openai() for tool in TASKS.tools]


async def _run(
    messages: list[ChatMessage],
    *,
    tools: list[dict[str, Any]] | None = TOOLS,
    tool_choice: str | None = None,
) -> tuple[str, Completion]:
    request = CompletionRequest("m", messages, tools=tools, tool_choice=tool_choice)
    events = await model_events(DemoChatClient(delay_seconds=0), request)
    *deltas, completion = events
    assert isinstance(completion, Completion)
    assert all(isinstance(delta, TextDelta) for delta in deltas)
    return "".join(delta.text for delta in deltas if isinstance(delta, TextDelta)), completion


async def _one_call(messages: list[ChatMessage], **options: Any) -> ToolCall:
    text, completion = await _run(messages, **options)
    assert (text, completion.finish_reason, len(completion.tool_calls)) == ("", "tool_calls", 1)
    return completion.tool_calls[0]


async def _words(messages: list[ChatMessage], **options: Any) -> str:
    text, completion = await _run(messages, **options)
    assert (completion.finish_reason, completion.tool_calls) == ("stop", ())
    return text


def _answered(messages: list[ChatMessage], call: ToolCall, result: Any) -> list[ChatMessage]:
    content = result if isinstance(result, str) else json.dumps(result)
    return [
        *messages,
        ChatMessage("assistant", "", tool_calls=[call.to_openai()]),
        ChatMessage("tool", content, tool_call_id=call.id),
    ]


def _task(title: str, **fields: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return task_out(
        Task(id=uuid.uuid4(), title=title, done=False, created_at=now, updated_at=now, **fields)
    )


def _user(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


@pytest.mark.parametrize(
    "text",
    [
        "add a task to buy milk",
        "Add buy milk to my tasks",
        "please add a task: buy milk.",
        'Add a new todo called "buy milk"',
        "add buy milk to my todo list, please!",
        "Remind me to buy milk",
    ],
)
async def test_asking_to_add_a_task_calls_add_task(text: str) -> None:
    call = await _one_call(_user(text))
    assert call.name == "add_task"
    assert call.arguments == '{"title":"buy milk"}'
    assert call.id.startswith("call_")


async def test_today_and_tomorrow_become_the_due_date() -> None:
    call = await _one_call(_user("remind me to call mom tomorrow"))
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    assert json.loads(call.arguments) == {"title": "call mom", "due_date": tomorrow}


async def test_every_call_has_its_own_id_and_counted_tokens() -> None:
    _, first = await _run(_user("add a task to buy milk"))
    _, second = await _run(_user("add a task to buy milk"))
    assert first.tool_calls[0].id != second.tool_calls[0].id
    assert first.usage is not None
    assert first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


async def test_the_added_task_is_reported_in_words() -> None:
    messages = _user("add a task to buy milk")
    call = await _one_call(messages)
    text = await _words(_answered(messages, call, _task("buy milk")))
    assert text == 'Added "buy milk" to your tasks.'


@pytest.mark.parametrize(
    "text", ["list my tasks", "What are my tasks?", "show my todo list", "what\u2019s left?"]
)
async def test_asking_for_the_list_lists_open_tasks(text: str) -> None:
    call = await _one_call(_user(text))
    assert (call.name, json.loads(call.arguments)) == ("list_tasks", {"done": False})


async def test_the_list_comes_back_numbered() -> None:
    messages = _user("what's left?")
    call = await _one_call(messages)
    tasks = [_task("buy milk"), _task("call mom", due_date=date(2026, 12, 1))]
    text = await _words(_answered(messages, call, {"tasks": tasks, "count": 2}))
    assert text == "Your open tasks:\n1. buy milk\n2. call mom (due 2026-12-01)"
    empty = await _words(_answered(messages, call, {"tasks": [], "count": 0}))
    assert empty == "You have no open tasks."


@pytest.mark.parametrize(
    ("text", "tool", "only_open"),
    [
        ("mark buy milk as done", "complete_task", True),
        ("Complete the buy milk task", "complete_task", True),
        ('finish "buy milk"', "complete_task", True),
        ("delete buy milk", "delete_task", False),
        ("remove the task buy milk from my list", "delete_task", False),
    ],
)
async def test_completing_or_deleting_finds_the_task_first(
    text: str, tool: str, only_open: bool
) -> None:
    messages = _user(text)
    find = await _one_call(messages)
    expected = {"query": "buy milk", "done": False} if only_open else {"query": "buy milk"}
    assert (find.name, json.loads(find.arguments)) == ("list_tasks", expected)

    milk = _task("buy milk")
    messages = _answered(messages, find, {"tasks": [milk], "count": 1})
    act = await _one_call(messages)
    assert (act.name, json.loads(act.arguments)) == (tool, {"task_id": milk["id"]})

    result = {**milk, "done": True} if tool == "complete_task" else {"deleted": milk}
    text = await _words(_answered(messages, act, result))
    verb = "Marked" if tool == "complete_task" else "Deleted"
    assert text.startswith(f'{verb} "buy milk"')


async def test_an_exact_title_wins_among_several_matches() -> None:
    messages = _user("delete buy milk")
    find = await _one_call(messages)
    milk = _task("Buy milk")
    found = {"tasks": [_task("buy milk powder"), milk], "count": 2}
    act = await _one_call(_answered(messages, find, found))
    assert json.loads(act.arguments) == {"task_id": milk["id"]}


async def test_no_match_or_several_are_answered_in_words() -> None:
    messages = _user("complete milk")
    find = await _one_call(messages)
    none = await _words(_answered(messages, find, {"tasks": [], "count": 0}))
    assert none == 'You have no open tasks matching "milk".'
    several = {"tasks": [_task("buy milk"), _task("buy oat milk")], "count": 2}
    text = await _words(_answered(messages, find, several))
    assert text == (
        'Your open tasks matching "milk":\n1. buy milk\n2. buy oat milk\nWhich one do you mean?'
    )


async def test_an_error_result_is_reported() -> None:
    messages = _user("add a task to buy milk")
    call = await _one_call(messages)
    failed = error_result("the tool took longer than 15 s").content
    text = await _words(_answered(messages, call, failed))
    assert text == "Sorry, add_task failed: the tool took longer than 15 s."


async def test_tool_choice_none_and_missing_tools_get_the_usual_reply() -> None:
    usual = await _words(_user("add a task to buy milk"), tools=None)
    assert usual.startswith(
        'Hello! I am the offline demo model. You said: "add a task to buy milk"'
    )
    assert "Try" not in usual
    assert await _words(_user("add a task to buy milk"), tool_choice="none") == usual
    list_only = [tool for tool in TOOLS if tool["function"]["name"] == "list_tasks"]
    assert await _words(_user("add a task to buy milk"), tools=list_only) == usual
    without_delete = [tool for tool in TOOLS if tool["function"]["name"] != "delete_task"]
    assert (await _words(_user("delete buy milk"), tools=without_delete)).startswith("Hello!")


async def test_tool_choice_none_after_a_search_answers_in_words() -> None:
    messages = _user("complete buy milk")
    find = await _one_call(messages)
    answered = _answered(messages, find, {"tasks": [_task("buy milk")], "count": 1})
    text = await _words(answered, tool_choice="none")
    assert text == 'Your open tasks matching "buy milk":\n1. buy milk'


async def test_other_messages_get_the_usual_reply_with_a_hint_when_tools_are_offered() -> None:
    text = await _words(_user("Hello demo"))
    assert 'You said: "Hello demo"' in text
    assert 'Try "add a task to buy milk" to watch me call a tool.' in text
    assert text.endswith("Set OPENAI_API_KEY or OPENAI_BASE_URL to talk to a real model.")


async def test_the_whole_loop_against_the_real_tools(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async def say(text: str) -> str:
        messages = _user(text)
        for _ in range(3):
            reply, completion = await _run(messages)
            if not completion.tool_calls:
                return reply
            messages.append(
                ChatMessage(
                    "assistant", reply, tool_calls=[c.to_openai() for c in completion.tool_calls]
                )
            )
            for call in completion.tool_calls:
                result = await run_task_tool(sessionmaker, "alice", call.name, call.arguments)
                messages.append(ChatMessage("tool", result.content, tool_call_id=call.id))
        raise AssertionError("the demo model kept calling tools")

    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    assert await say("Add a task to buy milk") == 'Added "buy milk" to your tasks.'
    added = await say("remind me to call mom tomorrow")
    assert added == f'Added "call mom" to your tasks, due {tomorrow}.'
    listed = await say("list my tasks")
    assert listed == f"Your open tasks:\n1. buy milk\n2. call mom (due {tomorrow})"
    assert await say("mark buy milk as done") == 'Marked "buy milk" as done.'
    assert await say("what's left?") == f"Your open tasks:\n1. call mom (due {tomorrow})"
    assert await say("complete buy milk") == 'You have no open tasks matching "buy milk".'
    assert await say("delete call mom") == 'Deleted "call mom" from your tasks.'
    assert await say("what are my tasks") == "You have no open tasks."
