"""A tool: a name, a JSON schema for its arguments, and a handler that acts for the user the
service names. The arguments come from the model and are checked against the schema before the
handler sees them; whatever goes wrong comes back as an error result for the model to read,
never as an exception that would fail the turn."""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from jsonschema import Draft202012Validator
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.sanitize import clean_text, strict_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Who a call is for: set by the service from the conversation's owner, never by the model."""

    user_id: str
    sessionmaker: async_sessionmaker[AsyncSession]


class ToolError(Exception):
    """A failure the model should read and can act on (an unknown id, say)."""


Handler = Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    """JSON Schema (2020-12) of the arguments object."""
    handler: Handler

    def __post_init__(self) -> None:
        Draft202012Validator.check_schema(self.parameters)

    def to_openai(self) -> dict[str, Any]:
        """The tool as the Chat Completions `tools` parameter describes one."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class Toolset:
    name: str
    description: str
    tools: tuple[Tool, ...]

    def get(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)


@dataclass(frozen=True, slots=True)
class ToolResult:
    status: Literal["ok", "error"]
    content: str
    """JSON text, as it goes back to the model."""


def error_result(message: str) -> ToolResult:
    return ToolResult("error", clean_text(json.dumps({"error": message}, ensure_ascii=False)))


def argument_errors(tool: Tool, arguments: object) -> list[str]:
    """What is wrong with the arguments, as short sentences (at most five)."""
    validator = Draft202012Validator(
        tool.parameters, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    found = sorted(validator.iter_errors(arguments), key=lambda error: list(error.path))
    return [
        f"{'/'.join(str(part) for part in error.path) or 'arguments'}: {error.message}"[:300]
        for error in found[:5]
    ]


async def run_tool(
    tool: Tool,
    context: ToolContext,
    arguments: str,
    *,
    timeout_seconds: float,
    max_result_chars: int,
) -> ToolResult:
    """Parse, validate and run one call. A cancelled reply cancels the call (CancelledError
    passes through); everything else ends as a result."""
    try:
        parsed = strict_json(arguments or "{}")
    except (ValueError, RecursionError):
        return error_result("the arguments are not valid JSON")
    if errors := argument_errors(tool, parsed):
        return error_result("invalid arguments: " + "; ".join(errors))
    deadline = asyncio.timeout(timeout_seconds)
    try:
        async with deadline:
            result = await tool.handler(context, parsed)
        # A tool's output enters here: made storable once (an MCP server may send anything).
        content = clean_text(json.dumps(result, ensure_ascii=False, default=str))
    except TimeoutError:
        if deadline.expired():
            return error_result(f"the tool took longer than {timeout_seconds:g} s")
        logger.exception("tool %s timed out inside", tool.name)
        return error_result("the tool failed")
    except ToolError as exc:
        return error_result(str(exc))
    except Exception:
        logger.exception("tool %s failed", tool.name)
        return error_result("the tool failed")
    return ToolResult("ok", _bounded(content, max_result_chars))


def _bounded(content: str, max_chars: int) -> str:
    """The result, or as much of it as fits in `max_chars`, marked as cut: the model must not
    take a part for the whole."""
    if len(content) <= max_chars:
        return content
    keep = max_chars
    while keep > 0:
        cut = json.dumps({"truncated": True, "partial_result": content[:keep]}, ensure_ascii=False)
        if len(cut) <= max_chars:
            return cut
        keep -= len(cut) - max_chars
    return '{"truncated": true}'
