"""What a reply is made of on its way to clients: deltas and tool events at stream positions,
then an outcome. A position counts the characters of text and one for each tool event, so a
reply that calls no tools is positioned by characters alone."""

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Delta:
    text: str
    end: int
    """The stream position once this delta is delivered."""

    @property
    def start(self) -> int:
        return self.end - len(self.text)

    def after(self, position: int) -> "Delta":
        """The part of this delta past `position` (which falls inside it)."""
        return Delta(self.text[position - self.start :], self.end)


@dataclass(frozen=True, slots=True)
class ToolEvent:
    """A call the model made (`tool_call`) or its result (`tool_result`), between deltas."""

    kind: str
    data: dict[str, Any]
    end: int

    @property
    def start(self) -> int:
        return self.end - 1


Item = Delta | ToolEvent
Batch = tuple[Item, ...]
"""Deltas and tool events in order, available at the same moment."""


def items_after(items: list[Item], position: int) -> list[Item]:
    """The part of `items` past `position`, cutting into a delta where it falls."""
    rest: list[Item] = []
    for item in items:
        if item.end <= position:
            continue
        if isinstance(item, Delta) and item.start < position:
            item = item.after(position)
        rest.append(item)
    return rest


def round_text(items: list[Item]) -> str:
    """The text after the last tool event: that of the round under way."""
    text: list[str] = []
    for item in items:
        if isinstance(item, Delta):
            text.append(item.text)
        else:
            text = []
    return "".join(text)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a reply ended: the stored message, and the problem document if it failed."""

    message: dict[str, Any]
    problem: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    """Response headers that go with the problem (Retry-After on a 429)."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """The calls the reply made, with the start of each result."""


class StopReason(enum.Enum):
    CANCELLED = "cancelled"
    """Somebody asked for it to stop (`POST /v1/messages/{id}/cancel`, or a client leaving)."""
    SHUTDOWN = "shutdown"
    """The process is stopping."""
    SUPERSEDED = "superseded"
    """The stored row was finished elsewhere (cancelled on another instance, swept, or its
    conversation deleted)."""
