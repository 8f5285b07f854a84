"""Input types for request schemas: text PostgreSQL can store and people meant to send."""

import json
from typing import Annotated, Any

from pydantic import AfterValidator, StringConstraints

MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8


def _no_nul(value: str) -> str:
    """Text PostgreSQL can store: no NUL, and no lone surrogates (not encodable as UTF-8)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _json_without_nul(value: Any) -> None:
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _json_without_nul(item)
    elif isinstance(value, list):
        for item in value:
            _json_without_nul(item)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    if _depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"must be nested at most {MAX_METADATA_DEPTH} levels deep")
    _json_without_nul(value)
    if len(json.dumps(value, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
NonBlankText = Annotated[
    str, StringConstraints(min_length=1), AfterValidator(_no_nul), AfterValidator(_not_blank)
]
Title = Annotated[str, StringConstraints(max_length=500), AfterValidator(_no_nul)]
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\w.:/@+-]+$")
]
SystemPrompt = Annotated[str, StringConstraints(max_length=100_000), AfterValidator(_no_nul)]
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata)]
ProfileName = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_-]*$")
]
