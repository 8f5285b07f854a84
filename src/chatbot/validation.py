"""Input types for request schemas: text PostgreSQL can store and people meant to send."""

import json
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, WithJsonSchema

from chatbot.config import TOOLSET_NAME_PATTERN

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


# Whitespace as both Python and JavaScript regular expressions know it, spelled out so that the
# pattern in the OpenAPI schema means the same to every client as it does here.
_WHITESPACE = r"\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK_PATTERN = f"[^{_WHITESPACE}]"
_NOT_BLANK = re.compile(NOT_BLANK_PATTERN)


def _not_blank(value: str) -> str:
    if _NOT_BLANK.search(value) is None:
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


def _not_boolean(value: Any) -> Any:
    """JSON `true` is not a number, though Python's bool is an int; 5.0 still is an integer."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# Constraints before validators, or pydantic leaves them out of the JSON schema.
Temperature = Annotated[float, Field(ge=0, le=2), BeforeValidator(_not_boolean)]


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
    try:
        encoded = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError("must be JSON: NaN, Infinity and numbers past 1.8e308 are not") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
NonBlankText = Annotated[
    str,
    StringConstraints(min_length=1),
    Field(json_schema_extra={"pattern": NOT_BLANK_PATTERN}),
    AfterValidator(_no_nul),
    AfterValidator(_not_blank),
]
Title = Annotated[str, StringConstraints(max_length=500), AfterValidator(_no_nul)]
# Spelled out: `\w` is Unicode to the server's regex engine and ASCII to the OpenAPI schema's
# (ECMA-262), so "æ" passed the one and not the other.
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:/@+-]+$")
]
SystemPrompt = Annotated[str, StringConstraints(max_length=100_000), AfterValidator(_no_nul)]
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata)]
SETTING_MARK = "x-from-settings"
"""Marks a constraint that depends on settings; the app writes it into the OpenAPI schema."""
ProfileName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_-]*$"),
    WithJsonSchema({"type": "string", SETTING_MARK: "prompt_profiles"}, mode="validation"),
]
ToolsetName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=32, pattern=TOOLSET_NAME_PATTERN),
    WithJsonSchema({"type": "string", SETTING_MARK: "toolsets"}, mode="validation"),
]


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


ToolsetNames = Annotated[
    list[ToolsetName],
    Field(max_length=16, description="The toolsets this conversation's replies may use"),
    AfterValidator(_unique),
]
MaxOutputTokens = Annotated[
    int,
    Field(ge=1, le=1_000_000),
    BeforeValidator(_not_boolean),
    WithJsonSchema(
        {"type": "integer", "minimum": 1, SETTING_MARK: "max_output_tokens"}, mode="validation"
    ),
]
