"""A reply's status: `in_progress`, then one final status, set once.

    in_progress -> completed | incomplete | failed | cancelled

Three parties may end a reply, each only to the statuses that are theirs to give:
- its runner, however the reply went (the model finished, failed, was stopped or timed out);
- a cancel asked where the reply does not run: `cancelled`, with its last checkpoint;
- the sweep, for a reply whose producer is gone: `incomplete`, with its last checkpoint.
"Once" is the database's to keep: every statement that ends a reply is conditional on
`in_progress`, so of two parties racing, one ends it and the other finds it final.
"""

import enum

from chatbot.messages.models import MessageStatus


class Mover(enum.Enum):
    RUNNER = "runner"
    CANCEL = "cancel"
    SWEEP = "sweep"


FINAL = frozenset(
    {
        MessageStatus.COMPLETED,
        MessageStatus.INCOMPLETE,
        MessageStatus.FAILED,
        MessageStatus.CANCELLED,
    }
)

_MAY_SET = {
    Mover.RUNNER: FINAL,
    Mover.CANCEL: frozenset({MessageStatus.CANCELLED}),
    Mover.SWEEP: frozenset({MessageStatus.INCOMPLETE}),
}


class IllegalMove(ValueError):
    """A party tried to give a reply a status that is not its to give."""


def check_move(mover: Mover, status: MessageStatus) -> MessageStatus:
    if status not in _MAY_SET[mover]:
        raise IllegalMove(f"the {mover.value} may not end a reply as {status.value}")
    return status


def failed_or_incomplete(has_text: bool) -> MessageStatus:
    """How a reply that failed ends: what it said is kept as `incomplete`."""
    return MessageStatus.INCOMPLETE if has_text else MessageStatus.FAILED
