"""The JSON of every turn and event: orjson's bytes where it can, the standard encoder's where
it cannot, and the same text either way."""

import json
from typing import Any

import pytest

from chatbot import json_codec

VALUES: dict[str, Any] = {
    "text": {"content": 'caf\u00e9 \u2028 \x01\x1f\x7f "q" \\ / \U0001f600 \t\n', "n": 2**63 - 1},
    "nested": {"b": [1, None, True, {"z": "", "a": []}], "a": {"y": 0, "x": -5}},
    "empty": {},
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
@pytest.mark.parametrize("sort_keys", [False, True])
def test_the_bytes_are_the_standard_encoders(value: Any, sort_keys: bool) -> None:
    standard = json.dumps(value, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":"))
    assert json_codec.dumps(value, sort_keys=sort_keys) == standard.encode()


@pytest.mark.parametrize(
    "value", [{"text": "lone \ud800 surrogate"}, {"big": 2**70}], ids=["surrogate", "big int"]
)
def test_what_orjson_refuses_is_still_written(value: Any) -> None:
    written = json_codec.dumps(value, sort_keys=True)
    assert json.loads(written) == value
    assert written.isascii()
