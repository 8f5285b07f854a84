"""Following a reply from any character: live from this process, or from the database."""

import asyncio
import uuid
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.errors import problem
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus
from chatbot.messages.schemas import MessageOut
from chatbot.streams.registry import Delta, Deltas, Outcome, ReplyRegistry

_FAILED = (MessageStatus.FAILED, MessageStatus.INCOMPLETE)


def outcome_of(message: Message, headers: dict[str, str] | None = None) -> Outcome:
    """The outcome a stored, finished reply stands for."""
    stored = MessageOut.of(message).model_dump(mode="json")
    if message.status not in _FAILED:
        return Outcome(message=stored)
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
    )


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
        """The reply from character `starting_after` on, then its outcome.

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
            if len(message.content) > delivered:
                yield (Delta(message.content[delivered:], len(message.content)),)
                delivered = len(message.content)
            if message.status is not MessageStatus.IN_PROGRESS:
                yield outcome_of(message)
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
