"""Values from outside (a model provider, a tool, an MCP server) made storable where they enter.

Text: PostgreSQL refuses NUL in text, and a lone UTF-16 surrogate (what the JSON escape `\\ud800`
decodes to) cannot be encoded as UTF-8 at all, by any database driver or HTTP response. Both
become U+FFFD, as a Unicode-correct decoder would make of them; every other character stays.
Counts: the integer columns hold 32-bit signed values; a provider's number that is not a whole,
finite, non-negative number is no count at all.
"""

import json
import math
import re
from typing import Any

REPLACEMENT = "\ufffd"
MAX_COUNT = 2**31 - 1
"""The largest value an INTEGER column holds on PostgreSQL (SQLite holds more)."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(text: str) -> str:
    """The text with NUL and lone surrogates replaced by U+FFFD."""
    if (text.isascii() and "\x00" not in text) or _UNSTORABLE.search(text) is None:
        return text  # the common case, checked first: ASCII is never a surrogate
    return _UNSTORABLE.sub(REPLACEMENT, text)


def clean_label(text: str, max_chars: int) -> str | None:
    """A short name a provider sends (a model, a finish reason), cut to its column; None
    when nothing is left."""
    return clean_text(text)[:max_chars] or None


def whole_number(value: object) -> int | None:
    """A JSON number that is a whole number (2048 or 2048.0), else None (text, booleans,
    fractions, NaN, infinities)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        return int(value)
    return value if isinstance(value, int) else None


def clean_count(value: object) -> int | None:
    """A token count as a provider sent it: a whole non-negative number, clamped to what a
    column holds; None for anything else (text, booleans, fractions, NaN, negatives)."""
    number = whole_number(value)
    if number is None or number < 0:
        return None
    return min(number, MAX_COUNT)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number")
    return value


def strict_json(text: str) -> Any:
    """JSON as RFC 8259 has it: `NaN`, `Infinity` and numbers too large for a float (`1e999`)
    are a ValueError, not values no database column or client can take."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
