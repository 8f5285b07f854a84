"""Following a reply from any character: live from this process, or from the database."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.errors import problem
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus
from chatbot.messages.schemas import MessageOut
from chatbot.streams.registry import Delta, Deltas, Item, Outcome, ReplyRegistry, ToolEvent
from chatbot.tools.events import calls_made, stored_events

_FAILED = (MessageStatus.FAILED, MessageStatus.INCOMPLETE)


def outcome_of(
    message: Message,
    headers: dict[str, str] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> Outcome:
    """The outcome a stored, finished reply stands for."""
    stored = MessageOut.of(message).model_dump(mode="json")
    if message.status not in _FAILED:
        return Outcome(message=stored, tool_calls=tool_calls or [])
    error = message.error or {}
    return Outcome(
        message=stored,
        problem=problem(
            int(error.get("status", 502)),
            str(error.get("detail", "The reply did not complete")),
            str(error.get("code", "reply_failed")),
            assistant_message_id=str(message.id),
        ),
        headers=headers,
        tool_calls=tool_calls or [],
    )


def stored_outcome(
    message: Message, turn: list[Message], headers: dict[str, str] | None = None
) -> Outcome:
    """The outcome of a finished reply read back with its turn (`messages.turn_of`)."""
    return outcome_of(message, headers, calls_made(stored_events(turn)))


def stored_items(events: list[tuple[str, str | dict[str, Any]]], reply: Message) -> list[Item]:
    """A stored reply as the stream it was: the tool rounds of its turn (`stored_events`), then
    its text, with the positions the live stream gave them."""
    items: list[Item] = []
    position = 0
    for kind, data in [*events, ("text", reply.content)]:
        if isinstance(data, str):
            position += len(data)
            if data:
                items.append(Delta(data, position))
        else:
            position += 1
            items.append(ToolEvent(kind, data, position))
    return items


def _after(items: list[Item], position: int) -> list[Item]:
    """The part of `items` past `position`, cutting into a delta where it falls."""
    rest: list[Item] = []
    for item in items:
        if item.end <= position:
            continue
        if isinstance(item, Delta) and item.end - len(item.text) < position:
            item = item.after(position)
        rest.append(item)
    return rest


class ReplyFollower:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        registry: ReplyRegistry,
        poll_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._registry = registry
        self._poll_seconds = poll_seconds

    async def events(
        self, message_id: uuid.UUID, starting_after: int = 0
    ) -> AsyncIterator[Deltas | Outcome]:
        """The reply from position `starting_after` on, then its outcome.

        A reply running in this process is followed delta by delta. Otherwise the database
        has it: finished (replayed at once) or running in another process, which checkpoints
        it every few seconds (followed at that pace).
        """
        generation = self._registry.get(message_id)
        if generation is not None:
            async for item in generation.follow(starting_after):
                yield item
            return
        delivered = starting_after
        while True:
            async with self._sessionmaker() as session:
                message = await messages.get(session, message_id)
                turn = await messages.turn_of(session, message) if message else []
            if message is None:
                yield Outcome(
                    message={"id": str(message_id)},
                    problem=problem(
                        404,
                        "The message no longer exists",
                        "message_not_found",
                        assistant_message_id=str(message_id),
                    ),
                )
                return
            if fresh := _after(stored_items(stored_events(turn), message), delivered):
                yield tuple(fresh)
                delivered = fresh[-1].end
            if message.status is not MessageStatus.IN_PROGRESS:
                yield stored_outcome(message, turn)
                return
            await asyncio.sleep(self._poll_seconds)

    async def outcome(self, message_id: uuid.UUID) -> Outcome:
        generation = self._registry.get(message_id)
        if generation is not None:
            return await generation.wait()
        async for item in self.events(message_id):
            if isinstance(item, Outcome):
                return item
        raise AssertionError("every reply stream ends with an outcome")
