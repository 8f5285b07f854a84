"""One round of tool calls within a reply: its calls, run side by side, each bounded in time and
size, and their results announced in the order of the calls."""

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.config import Settings
from chatbot.llm.client import ToolCall
from chatbot.replies.events import call_data, result_data
from chatbot.replies.live import LiveReply
from chatbot.tools.base import Tool, ToolContext, ToolResult, error_result, run_tool

MAX_CALLS_PER_ROUND = 16
"""Calls of one round that run; more are answered with an error result (a model, or a prompt
injected through a tool's result, must not start hundreds of calls at once)."""
MAX_CALL_ID_CHARS = 100
"""What the column a tool message's call id is stored in holds."""


def with_own_ids(calls: Iterable[ToolCall], taken: set[str]) -> tuple[ToolCall, ...]:
    """Every call with an id of its own within the turn: some servers send none, or the same
    one each round, or one longer than can be stored."""
    fixed = []
    for call in calls:
        if not call.id or call.id in taken or len(call.id) > MAX_CALL_ID_CHARS:
            call = replace(call, id=f"call_{uuid.uuid4().hex[:24]}")
        taken.add(call.id)
        fixed.append(call)
    return tuple(fixed)


@dataclass
class ToolRound:
    """One round of calls: stored, then running, then answered."""

    calls: tuple[ToolCall, ...]
    first_seq: int
    """The position of the first call's result."""
    model: str
    listed: list[dict[str, Any]]
    """The turn's list of calls with their results, as the finished turn reports them; this
    round's calls are its last entries."""
    results: dict[str, ToolResult] = field(default_factory=dict)
    announced: int = 0
    """Results sent as events so far: always a prefix of the calls, so the stream has them in
    the order they are stored and replayed."""

    def announce_calls(self, reply: LiveReply) -> None:
        for call in self.calls:
            event = call_data(call.to_openai())
            reply.add_event("tool_call", event)
            self.listed.append(event | {"status": None, "result": None})

    def announce_results(self, reply: LiveReply) -> None:
        """Send the results that are in, in the order of the calls."""
        first = len(self.listed) - len(self.calls)
        while self.announced < len(self.calls) and self.calls[self.announced].id in self.results:
            call = self.calls[self.announced]
            result = self.results[call.id]
            event = result_data(call.id, call.name, result.status, result.content)
            reply.add_event("tool_result", event)
            self.listed[first + self.announced].update(
                status=event["status"], result=event["result"]
            )
            self.announced += 1

    def answer_the_rest(self, reply: LiveReply, why: str) -> None:
        """A result for every call still open, so no stored call is left without one."""
        for call in self.calls:
            self.results.setdefault(call.id, error_result(why))
        self.announce_results(reply)

    async def run(
        self,
        reply: LiveReply,
        tools: Mapping[str, Tool],
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
    ) -> None:
        """Run the calls side by side, for the reply's user (never one an argument names)."""
        context = ToolContext(reply.ref.user_id, sessionmaker)

        async def run(index: int, call: ToolCall) -> None:
            tool = tools.get(call.name)
            if index >= MAX_CALLS_PER_ROUND:
                result = error_result(
                    f"at most {MAX_CALLS_PER_ROUND} calls run in one round; make this one again"
                )
            elif tool is None:
                result = error_result(f"there is no tool named {call.name!r}")
            else:
                result = await run_tool(
                    tool,
                    context,
                    call.arguments,
                    timeout_seconds=settings.tool_timeout_seconds,
                    max_result_chars=settings.tool_max_result_chars,
                )
            self.results[call.id] = result
            self.announce_results(reply)

        async with asyncio.TaskGroup() as group:
            for index, call in enumerate(self.calls):
                group.create_task(run(index, call))
