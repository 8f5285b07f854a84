"""The outcome of a reply, from its stored row (and its turn), or when the row cannot be had."""

import uuid
from typing import Any

from chatbot.errors import AppError, problem
from chatbot.messages.models import Message, MessageStatus
from chatbot.messages.schemas import MessageOut
from chatbot.replies.errors import ReplyGone, StorageUnavailable
from chatbot.replies.events import calls_made, stored_events
from chatbot.replies.items import Delta, Item, Outcome, ToolEvent

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


def stored_items(turn: list[Message], reply: Message) -> list[Item]:
    """A stored reply as the stream it was: the tool rounds of its turn, then its text, at the
    positions the live stream gave them."""
    items: list[Item] = []
    position = 0
    for kind, data in [*stored_events(turn), ("text", reply.content)]:
        if isinstance(data, str):
            position += len(data)
            if data:
                items.append(Delta(data, position))
        else:
            position += 1
            items.append(ToolEvent(kind, data, position))
    return items


def without_end(
    message_id: uuid.UUID,
    error: AppError,
    *,
    message: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """The outcome of a reply with no stored end to show: `error` says why."""
    return Outcome(
        message=message or {"id": str(message_id)},
        problem=error.to_problem() | {"assistant_message_id": str(message_id)},
        headers=headers,
    )


def gone(message_id: uuid.UUID, error: AppError | None = None) -> Outcome:
    """The outcome of a reply whose row is gone (its conversation was deleted)."""
    return without_end(message_id, error or ReplyGone())


def unreadable(message_id: uuid.UUID) -> Outcome:
    """The outcome of a reply whose stored state could not be read back."""
    return without_end(message_id, StorageUnavailable(), headers={"Retry-After": "1"})
