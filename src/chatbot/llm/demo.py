"""A built-in model for trying the service with no network and no API key.

Most messages get a canned reply, streamed one word at a time. When the request offers the task
tools (and `tool_choice` is not "none"), the model also calls them, so that the whole tool loop can
be watched offline. It reads the last user message case-insensitively, ignoring a leading "please"
or "can you" and trailing punctuation:

- "add a task to buy milk", "add a task: buy milk", "add buy milk to my tasks" (or "to my list",
  "to my todo list"), "remind me to buy milk": add_task with the title "buy milk". A trailing
  "today" or "tomorrow" ("remind me to call mom tomorrow") becomes the due date.
- "list my tasks", "show my todo list", "what are my tasks", "what's on my list", "what's left":
  list_tasks with done=false, so open tasks only.
- "complete X", "finish X", "check off X", "mark X as done", "mark done X": list_tasks for the
  open tasks whose title contains X, then complete_task on the match.
- "delete X", "remove X", "remove X from my tasks": list_tasks for the tasks whose title contains
  X, then delete_task on the match.

X may be quoted or framed as "the task X" / "the X task". The match is the only task found, or
else the only one titled exactly X; with none or several, the reply says so in words.

A flow starts only if every tool it needs is offered. A call comes with no text. Once the history
ends in tool results, the reply says in words what they hold: the task added, a numbered list,
the task done or deleted, or the error.
"""

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import takewhile
from typing import Any

from chatbot.llm.client import (
    ChatMessage,
    Completion,
    CompletionRequest,
    StreamEvent,
    TextDelta,
    TokenUsage,
    ToolCall,
)

DEMO_MODEL = "demo-offline"

_TOKEN = re.compile(r"\s*\S+")
_STRAIGHT_QUOTES = str.maketrans("\u2018\u2019\u201c\u201d", "''\"\"")
_POLITE = re.compile(r"^(?:(?:please|(?:can|could|would) you),? )*|(?:,? please)?[.!?]*$", re.I)
_LIST = r"(?:my |the )?(?:tasks|task list|to-?dos|to-?do list|list)"
_INTENTS = [
    (action, re.compile(pattern, re.I))
    for action, pattern in [
        ("add", r"add (?:a |another )?(?:new )?(?:task|to-?do)(?: to| called)?:? (.+)"),
        ("add", rf"add (.+?) to {_LIST}"),
        ("add", r"remind me to (.+)"),
        ("list", rf"(?:list|show(?: me)?|what(?:'s| is| are)(?: on)?) (?:all )?{_LIST}"),
        ("list", r"what(?:'s| is) left(?: to do)?"),
        ("complete", r"mark (?:as )?done (.+)"),
        ("complete", r"mark (.+?) (?:as )?(?:done|complete|completed|finished)"),
        ("complete", r"(?:complete|finish|check off|tick off) (.+)"),
        ("delete", rf"(?:delete|remove) (.+?)(?: from {_LIST})?"),
    ]
]
_TASK_FRAME = re.compile(r"^(?:the |my )?(?:task |to-?do )?|(?: task| to-?do)$", re.I)
_DUE = re.compile(r"(.+?),? (?:by |due |on )?(today|tomorrow)", re.I)
_NEEDS = {
    "add": {"add_task"},
    "list": {"list_tasks"},
    "complete": {"list_tasks", "complete_task"},
    "delete": {"list_tasks", "delete_task"},
}
_SECOND_STEP = {"complete": "complete_task", "delete": "delete_task"}


@dataclass(frozen=True, slots=True)
class _Intent:
    action: str
    """A key of `_NEEDS`."""
    subject: str
    """The title to add or the words naming a task; empty for a list."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One call of the round the history ends with, and what came back."""

    name: str
    arguments: dict[str, Any]
    result: Any
    """The parsed JSON result, or None if there was none to parse."""


def demo_reply(request: CompletionRequest) -> str:
    quoted = " ".join(_last_user(request.messages).split())
    if len(quoted) > 200:
        quoted = quoted[:200] + "..."
    turns = sum(1 for message in request.messages if message.role == "user")
    try_tools = (
        'Try "add a task to buy milk" to watch me call a tool. '
        if "add_task" in _offered(request)
        else ""
    )
    return (
        f'Hello! I am the offline demo model. You said: "{quoted}". '
        f"This is turn {turns} of our conversation, and every word of it is stored. "
        "I stream one word at a time so you can watch Server-Sent Events at work. "
        f"{try_tools}Set OPENAI_API_KEY or OPENAI_BASE_URL to talk to a real model."
    )


def _respond(request: CompletionRequest) -> tuple[str, tuple[ToolCall, ...]]:
    """The words to stream and the calls to make."""
    offered = _offered(request)
    intent = _intent(_last_user(request.messages))
    if outcomes := _last_round(request.messages):
        if intent and (call := _second_step(intent, outcomes, offered)):
            return "", (call,)
        return " ".join(_describe(outcome) for outcome in outcomes), ()
    if intent and _NEEDS[intent.action] <= offered:
        return "", (_first_step(intent),)
    return demo_reply(request), ()


def _offered(request: CompletionRequest) -> set[str]:
    if request.tool_choice == "none":
        return set()
    return {tool["function"]["name"] for tool in request.tools or ()}


def _last_user(messages: Sequence[ChatMessage]) -> str:
    return next((message.content for message in reversed(messages) if message.role == "user"), "")


def _intent(text: str) -> _Intent | None:
    text = _POLITE.sub("", " ".join(text.translate(_STRAIGHT_QUOTES).split()))
    for action, pattern in _INTENTS:
        if match := pattern.fullmatch(text):
            if action == "list":
                return _Intent(action, "")
            subject = match[1] if action == "add" else _TASK_FRAME.sub("", match[1])
            subject = subject.strip("\"' ")
            return _Intent(action, subject) if subject else None
    return None


def _first_step(intent: _Intent) -> ToolCall:
    if intent.action == "add":
        if match := _DUE.fullmatch(intent.subject):
            days = 1 if match[2].lower() == "tomorrow" else 0
            due = (date.today() + timedelta(days=days)).isoformat()
            return _call("add_task", {"title": match[1], "due_date": due})
        return _call("add_task", {"title": intent.subject})
    if intent.action == "list":
        return _call("list_tasks", {"done": False})
    only_open = {"done": False} if intent.action == "complete" else {}
    return _call("list_tasks", {"query": intent.subject, **only_open})


def _second_step(intent: _Intent, outcomes: list[_Outcome], offered: set[str]) -> ToolCall | None:
    """The call that acts on the task a complete or delete flow's list_tasks picked out."""
    name = _SECOND_STEP.get(intent.action)
    if name is None or name not in offered:
        return None
    match outcomes:
        case [_Outcome("list_tasks", _, {"tasks": list(tasks)})]:
            exact = [task for task in tasks if task["title"].lower() == intent.subject.lower()]
            for candidates in (tasks, exact):
                if len(candidates) == 1:
                    return _call(name, {"task_id": candidates[0]["id"]})
    return None


def _call(name: str, arguments: dict[str, Any]) -> ToolCall:
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, compact)


def _last_round(messages: Sequence[ChatMessage]) -> list[_Outcome]:
    """The calls whose results the history ends with; none if it ends otherwise."""
    answers = list(takewhile(lambda message: message.role == "tool", reversed(messages)))
    if not answers or len(answers) == len(messages):
        return []
    results = {message.tool_call_id: _parse(message.content) for message in answers}
    outcomes = []
    for call in messages[-len(answers) - 1].tool_calls or ():
        arguments = _parse(call["function"]["arguments"])
        outcomes.append(
            _Outcome(
                call["function"]["name"],
                arguments if isinstance(arguments, dict) else {},
                results.get(call["id"]),
            )
        )
    return outcomes


def _parse(content: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _describe(outcome: _Outcome) -> str:
    match outcome.name, outcome.result:
        case _, {"error": error}:
            return f"Sorry, {outcome.name} failed: {str(error).rstrip('.')}."
        case "add_task", {"title": title, "due_date": due}:
            return f'Added "{title}" to your tasks' + (f", due {due}." if due else ".")
        case "list_tasks", {"tasks": list(tasks)}:
            return _task_list(tasks, outcome.arguments)
        case "complete_task", {"title": title}:
            return f'Marked "{title}" as done.'
        case "delete_task", {"deleted": {"title": title}}:
            return f'Deleted "{title}" from your tasks.'
    return f"I called {outcome.name}, but I could not make sense of what came back."


def _task_list(tasks: list[dict[str, Any]], arguments: dict[str, Any]) -> str:
    kind = "open tasks" if arguments.get("done") is False else "tasks"
    if query := arguments.get("query"):
        kind += f' matching "{query}"'
    if not tasks:
        return f"You have no {kind}."
    lines = [f"Your {kind}:"]
    for number, task in enumerate(tasks, 1):
        due = f" (due {task['due_date']})" if task.get("due_date") else ""
        done = " (done)" if task.get("done") else ""
        lines.append(f"{number}. {task['title']}{due}{done}")
    if query and len(tasks) > 1:
        lines.append("Which one do you mean?")
    return "\n".join(lines)


def _count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


class DemoChatClient:
    def __init__(self, delay_seconds: float = 0.035) -> None:
        self._delay = delay_seconds

    def model_label(self, requested: str) -> str:
        return DEMO_MODEL

    def takes_tools(self, model: str) -> bool:
        return True

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        reply, calls = _respond(request)
        for token in _TOKEN.findall(reply):
            await asyncio.sleep(self._delay)
            yield TextDelta(token)
        prompt_tokens = sum(_count_tokens(message.content) + 4 for message in request.messages)
        completion_tokens = _count_tokens(reply) + sum(
            _count_tokens(f"{call.name} {call.arguments}") for call in calls
        )
        yield Completion(
            finish_reason="tool_calls" if calls else "stop",
            usage=TokenUsage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
            model=DEMO_MODEL,
            tool_calls=calls,
        )

    async def aclose(self) -> None:
        return None
