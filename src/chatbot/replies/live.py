"""A running reply as its producer holds it: the text of the round under way, the stream
position, where its row sits, why it was asked to stop, and the outcome once it is stored.

Only the reply's own runner adds to it; a stop is asked of it (`request_stop`); the keeper
reads what to checkpoint (`unsaved`) and says what it stored (`saved`). Every item also goes
to the live bus, which is how followers see it.
"""

import asyncio
import uuid
from dataclasses import dataclass, replace
from typing import Any

from chatbot.replies.bus import ReplyChannel
from chatbot.replies.items import Delta, Outcome, StopReason, ToolEvent
from chatbot.sanitize import clean_text


@dataclass(frozen=True, slots=True)
class ReplyRef:
    """Which reply: its row, its conversation and the user it is for."""

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    user_id: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a checkpoint stores of a running reply."""

    message_id: uuid.UUID
    content: str
    length: int
    seq: int

    def storable(self) -> "Snapshot":
        return replace(self, content=clean_text(self.content))


class LiveReply:
    def __init__(self, ref: ReplyRef, seq: int, channel: ReplyChannel) -> None:
        self.ref = ref
        self.message_id = ref.message_id
        self._channel = channel
        self._seq = seq
        self._round: list[str] = []
        self._length = 0
        self._saved_length = 0
        self._stop_reason: StopReason | None = None
        self._finishing = False
        self._outcome: Outcome | None = None
        self._ended = asyncio.Event()

    @property
    def content(self) -> str:
        """The text of the current round: what the reply's row holds. The text of earlier
        rounds went into the messages that called tools."""
        return "".join(self._round)

    @property
    def length(self) -> int:
        """The stream position: characters plus tool events produced so far."""
        return self._length

    @property
    def seq(self) -> int:
        """Where the reply's row sits; each round of tool calls moves it past its messages."""
        return self._seq

    @property
    def round_has_output(self) -> bool:
        """Whether the current round has any text (tool events do not count)."""
        return bool(self._round)

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop_reason

    @property
    def finishing(self) -> bool:
        """Set once the reply is being stored: from then on nothing may interrupt it."""
        return self._finishing

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def append(self, text: str) -> None:
        self._round.append(text)
        self._length += len(text)
        self._channel.publish(Delta(text, self._length))

    def add_event(self, kind: str, data: dict[str, Any]) -> None:
        self._length += 1
        self._channel.publish(ToolEvent(kind, data, self._length))

    def moved(self, seq: int) -> None:
        """A round of tool calls is stored: the reply's row moved to `seq`, and its text so far
        belongs to the message that called them."""
        self._seq = seq
        self._round = []

    def request_stop(self, reason: StopReason) -> bool:
        """Whether the reply should be interrupted now: not when a stop was asked already, nor
        while it is being stored (its outcome is then what the asker gets)."""
        if self._stop_reason is not None or self._finishing:
            return False
        self._stop_reason = reason
        return True

    def superseded(self) -> None:
        """The reply's row was found finished elsewhere, by the reply itself."""
        self._stop_reason = StopReason.SUPERSEDED

    def begin_finishing(self) -> None:
        self._finishing = True

    def unsaved(self) -> Snapshot | None:
        """What a checkpoint should store, if anything came since the last one."""
        if self._length == self._saved_length:
            return None
        return Snapshot(self.message_id, self.content, self._length, self._seq)

    def saved(self, snapshot: Snapshot) -> None:
        self._saved_length = max(self._saved_length, snapshot.length)

    def finish(self, outcome: Outcome) -> None:
        self._outcome = outcome
        self._channel.finish(outcome)
        self._ended.set()

    async def wait(self) -> Outcome:
        await self._ended.wait()
        assert self._outcome is not None
        return self._outcome

    def close(self) -> None:
        self._channel.close()
