"""How the tool calls of a turn are shown: SSE events, the list a finished turn reports, and both
rebuilt from the stored messages, identical to what the live reply sent."""

import json
from typing import Any

from chatbot.messages.models import Message, Role

RESULT_PREVIEW_CHARS = 300
"""A `tool_result` event carries the start of the result; the tool message holds all of it."""


def call_data(call: dict[str, Any]) -> dict[str, Any]:
    """The `tool_call` event of one call in the Chat Completions shape."""
    function = call.get("function") or {}
    return {
        "id": call.get("id"),
        "name": function.get("name"),
        "arguments": function.get("arguments"),
    }


def result_data(call_id: str, name: str | None, status: str, content: str) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "name": name,
        "status": status,
        "result": content[:RESULT_PREVIEW_CHARS],
        "truncated": len(content) > RESULT_PREVIEW_CHARS,
    }


def result_status(message: Message) -> str:
    return "error" if message.error else "ok"


def tool_error(content: str) -> dict[str, Any]:
    """What a tool message stores in `error` when the call failed: the model's own words."""
    try:
        detail = json.loads(content).get("error")
    except (ValueError, AttributeError):
        detail = None
    # Stored as JSON, where PostgreSQL refuses NUL.
    return {"code": "tool_error", "detail": str(detail or content).replace("\x00", "")[:500]}


def stored_events(turn: list[Message]) -> list[tuple[str, str | dict[str, Any]]]:
    """The text and tool events of a turn's stored messages before its reply, in stream order:
    each calling message's text, its calls, then their results."""
    events: list[tuple[str, str | dict[str, Any]]] = []
    names: dict[str, str | None] = {}
    for message in turn:
        if message.role is Role.ASSISTANT and message.tool_calls:
            if message.content:
                events.append(("text", message.content))
            for call in message.tool_calls:
                data = call_data(call)
                names[str(data["id"])] = data["name"]
                events.append(("tool_call", data))
        elif message.role is Role.TOOL and message.tool_call_id is not None:
            events.append(
                (
                    "tool_result",
                    result_data(
                        message.tool_call_id,
                        names.get(message.tool_call_id),
                        result_status(message),
                        message.content,
                    ),
                )
            )
    return events


def calls_made(events: list[tuple[str, str | dict[str, Any]]]) -> list[dict[str, Any]]:
    """The calls of a turn with their results, as the JSON answer and `done` list them."""
    calls: dict[str, dict[str, Any]] = {}
    for kind, data in events:
        if kind == "tool_call" and isinstance(data, dict):
            calls[str(data["id"])] = dict(data) | {"status": None, "result": None}
        elif kind == "tool_result" and isinstance(data, dict) and data["call_id"] in calls:
            calls[data["call_id"]].update(status=data["status"], result=data["result"])
    return list(calls.values())
