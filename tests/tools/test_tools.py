"""Tools and the task toolset: arguments checked against the schema, every call for the user the
service names, every failure a result the model can read."""

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.tasks.tools import TASKS
from chatbot.tools.base import Tool, ToolContext, ToolError, ToolResult, run_tool
from tests.support import run_task_tool


def _ok(result: ToolResult) -> Any:
    assert result.status == "ok", result.content
    return json.loads(result.content)


def _error(result: ToolResult) -> str:
    assert result.status == "error", result.content
    return str(json.loads(result.content)["error"])


async def test_a_task_is_added_listed_completed_updated_and_deleted(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    milk = _ok(await run_task_tool(sessionmaker, "alice", "add_task", {"title": " buy milk "}))
    assert milk["title"] == "buy milk"
    assert milk["done"] is False
    rent = _ok(
        await run_task_tool(
            sessionmaker,
            "alice",
            "add_task",
            {"title": "pay rent", "notes": "by transfer", "due_date": "2026-12-01"},
        )
    )
    listed = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {}))
    assert [task["title"] for task in listed["tasks"]] == ["buy milk", "pay rent"]

    done = _ok(await run_task_tool(sessionmaker, "alice", "complete_task", {"task_id": milk["id"]}))
    assert done["done"] is True
    assert done["completed_at"] is not None
    still_open = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {"done": False}))
    assert [task["title"] for task in still_open["tasks"]] == ["pay rent"]
    due = _ok(
        await run_task_tool(sessionmaker, "alice", "list_tasks", {"due_before": "2026-12-31"})
    )
    assert [task["id"] for task in due["tasks"]] == [rent["id"]]
    found = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {"query": "MILK"}))
    assert [task["id"] for task in found["tasks"]] == [milk["id"]]

    changed = _ok(
        await run_task_tool(
            sessionmaker,
            "alice",
            "update_task",
            {"task_id": rent["id"], "title": "pay the rent", "due_date": None, "done": True},
        )
    )
    assert (changed["title"], changed["due_date"], changed["done"]) == ("pay the rent", None, True)
    reopened = _ok(
        await run_task_tool(
            sessionmaker, "alice", "update_task", {"task_id": rent["id"], "done": False}
        )
    )
    assert reopened["completed_at"] is None

    deleted = _ok(
        await run_task_tool(sessionmaker, "alice", "delete_task", {"task_id": milk["id"]})
    )
    assert deleted["deleted"]["id"] == milk["id"]
    left = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {}))
    assert [task["id"] for task in left["tasks"]] == [rent["id"]]


async def test_a_tool_never_reaches_another_users_tasks(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    task = _ok(await run_task_tool(sessionmaker, "alice", "add_task", {"title": "alice's secret"}))
    assert _ok(await run_task_tool(sessionmaker, "bob", "list_tasks", {}))["tasks"] == []
    for name, arguments in [
        ("complete_task", {"task_id": task["id"]}),
        ("update_task", {"task_id": task["id"], "title": "mine now"}),
        ("delete_task", {"task_id": task["id"]}),
    ]:
        # The same answer as for an id that never existed.
        assert "no task with this id" in _error(
            await run_task_tool(sessionmaker, "bob", name, arguments)
        )
    unchanged = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {}))["tasks"]
    assert [(t["title"], t["done"]) for t in unchanged] == [("alice's secret", False)]


async def test_a_user_id_written_by_the_model_is_refused_not_obeyed(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    _ok(await run_task_tool(sessionmaker, "alice", "add_task", {"title": "alice's task"}))
    for arguments in [
        {"title": "planted", "user_id": "alice"},
        {"user_id": "alice"},
    ]:
        name = "add_task" if "title" in arguments else "list_tasks"
        message = _error(await run_task_tool(sessionmaker, "bob", name, arguments))
        assert "user_id" in message
    assert _ok(await run_task_tool(sessionmaker, "bob", "list_tasks", {}))["tasks"] == []
    alices = _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {}))["tasks"]
    assert [task["title"] for task in alices] == ["alice's task"]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("add_task", "{not json", "not valid JSON"),
        ("list_tasks", '{"limit": NaN}', "not valid JSON"),
        ("list_tasks", '{"limit": 1e999}', "not valid JSON"),
        ("add_task", "[1, 2]", "is not of type 'object'"),
        ("add_task", {}, "'title' is a required property"),
        ("add_task", {"title": "   "}, "title"),
        ("add_task", {"title": "x", "due_date": "next tuesday"}, "due_date"),
        ("list_tasks", {"limit": 1000}, "limit"),
        ("complete_task", {"task_id": "42"}, "task_id"),
        ("update_task", {"task_id": "00000000-0000-0000-0000-000000000000"}, "arguments"),
    ],
)
async def test_invalid_arguments_come_back_as_an_error_the_model_can_read(
    sessionmaker: async_sessionmaker[AsyncSession],
    name: str,
    arguments: dict[str, Any] | str,
    expected: str,
) -> None:
    assert expected in _error(await run_task_tool(sessionmaker, "alice", name, arguments))
    assert _ok(await run_task_tool(sessionmaker, "alice", "list_tasks", {}))["tasks"] == []


def _tool(handler: Any) -> Tool:
    return Tool("probe", "A test tool.", {"type": "object"}, handler)


async def _run(tool: Tool, *, seconds: float = 5, max_chars: int = 1000) -> ToolResult:
    context = ToolContext("alice", async_sessionmaker())
    return await run_tool(tool, context, "{}", timeout_seconds=seconds, max_result_chars=max_chars)


async def test_a_failing_slow_or_oversized_tool_is_a_result_not_a_failed_turn() -> None:
    async def broken(context: ToolContext, arguments: dict[str, Any]) -> Any:
        raise RuntimeError("database password is hunter2")

    async def refusing(context: ToolContext, arguments: dict[str, Any]) -> Any:
        raise ToolError("that list is archived")

    async def slow(context: ToolContext, arguments: dict[str, Any]) -> Any:
        await asyncio.sleep(10)

    async def huge(context: ToolContext, arguments: dict[str, Any]) -> Any:
        return {"rows": ['\u00e9"x' * 50] * 500}

    failed = _error(await _run(_tool(broken)))
    assert failed == "the tool failed"  # no internals reach the model
    assert _error(await _run(_tool(refusing))) == "that list is archived"
    assert "longer than 0.05 s" in _error(await _run(_tool(slow), seconds=0.05))
    cut = await _run(_tool(huge), max_chars=1000)
    assert len(cut.content) <= 1000
    assert json.loads(cut.content)["truncated"] is True


async def test_a_cancelled_reply_cancels_its_tool_call() -> None:
    started, finished = asyncio.Event(), asyncio.Event()

    async def waiting(context: ToolContext, arguments: dict[str, Any]) -> Any:
        started.set()
        await asyncio.sleep(10)
        finished.set()

    call = asyncio.create_task(_run(_tool(waiting)))
    await started.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not finished.is_set()


def test_every_task_tool_is_described_for_the_model() -> None:
    described = [tool.to_openai() for tool in TASKS.tools]
    assert [entry["function"]["name"] for entry in described] == [
        "add_task",
        "list_tasks",
        "complete_task",
        "update_task",
        "delete_task",
    ]
    for entry in described:
        parameters = entry["function"]["parameters"]
        assert parameters["additionalProperties"] is False
        assert "user_id" not in json.dumps(parameters)


async def test_arguments_nested_too_deep_and_a_timeout_inside_a_tool_are_results() -> None:
    async def echo(context: ToolContext, arguments: dict[str, Any]) -> Any:
        return arguments

    context = ToolContext("alice", async_sessionmaker())
    deep = "[" * 100_000 + "]" * 100_000
    nested = await run_tool(_tool(echo), context, deep, timeout_seconds=5, max_result_chars=1000)
    assert "not valid JSON" in _error(nested)

    async def driver_timeout(context: ToolContext, arguments: dict[str, Any]) -> Any:
        raise TimeoutError("the database did not answer")

    # Not the tool's own deadline: reported as a failure, not as "took longer than".
    assert _error(await _run(_tool(driver_timeout))) == "the tool failed"


async def test_a_result_that_is_not_json_is_an_error_result() -> None:
    async def odd(context: ToolContext, arguments: dict[str, Any]) -> Any:
        return {("a", "tuple"): "keys JSON cannot have"}

    result = await run_tool(
        Tool("odd", "Odd.", {"type": "object"}, odd),
        ToolContext("alice", None),  # type: ignore[arg-type]
        "{}",
        timeout_seconds=1,
        max_result_chars=1000,
    )
    assert result == ToolResult("error", '{"error": "the tool failed"}')
