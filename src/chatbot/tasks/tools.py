"""The task toolset: add, list, complete, update and delete the caller's tasks.

Every handler acts for `context.user_id`, which the service sets from the conversation's owner;
no schema has a user field, and an argument the schema does not name is refused."""

import uuid
from datetime import date
from typing import Any

from chatbot.tasks import repository as tasks
from chatbot.tasks.models import Task
from chatbot.tools.base import Tool, ToolContext, ToolError, Toolset

_TASK_ID = {
    "type": "string",
    "description": "The id of one of the user's tasks, as list_tasks or add_task gave it",
    "pattern": "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$",
}
_TITLE = {"type": "string", "minLength": 1, "maxLength": 500, "pattern": "\\S"}
_NOTES = {"type": ["string", "null"], "maxLength": 4000}
_DUE = {"type": ["string", "null"], "format": "date", "description": "YYYY-MM-DD"}


def task_out(task: Task) -> dict[str, Any]:
    return {
        "id": str(task.id),
        "title": task.title,
        "notes": task.notes,
        "done": task.done,
        "due_date": task.due_date.isoformat() if task.due_date else None,
        "created_at": task.created_at.isoformat(),
        "completed_at": task.completed_at.isoformat() if task.completed_at else None,
    }


def _date(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _not_found() -> ToolError:
    # The same words for a task of somebody else's as for one that never existed.
    return ToolError("there is no task with this id; list_tasks shows the user's tasks")


async def add_task(context: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    async with context.sessionmaker() as session:
        task = await tasks.add(
            session,
            context.user_id,
            arguments["title"].strip(),
            notes=arguments.get("notes"),
            due_date=_date(arguments.get("due_date")),
        )
        await session.commit()
        return task_out(task)


async def list_tasks(context: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    async with context.sessionmaker() as session:
        found = await tasks.list_tasks(
            session,
            context.user_id,
            done=arguments.get("done"),
            due_before=_date(arguments.get("due_before")),
            query=arguments.get("query"),
            limit=arguments.get("limit", 50),
        )
    return {"tasks": [task_out(task) for task in found], "count": len(found)}


async def complete_task(context: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    return await _change(context, arguments["task_id"], {"done": True})


async def update_task(context: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    changes = {name: value for name, value in arguments.items() if name != "task_id"}
    if "title" in changes:
        changes["title"] = changes["title"].strip()
    if "due_date" in changes:
        changes["due_date"] = _date(changes["due_date"])
    return await _change(context, arguments["task_id"], changes)


async def delete_task(context: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
    async with context.sessionmaker() as session:
        task = await tasks.delete(session, context.user_id, uuid.UUID(arguments["task_id"]))
        if task is None:
            raise _not_found()
        await session.commit()
        return {"deleted": task_out(task)}


async def _change(context: ToolContext, task_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    async with context.sessionmaker() as session:
        task = await tasks.update(session, context.user_id, uuid.UUID(task_id), changes)
        if task is None:
            raise _not_found()
        await session.commit()
        return task_out(task)


TASKS = Toolset(
    name="tasks",
    description="The user's own task list",
    tools=(
        Tool(
            "add_task",
            "Add a task to the user's task list.",
            {
                "type": "object",
                "properties": {"title": _TITLE, "notes": _NOTES, "due_date": _DUE},
                "required": ["title"],
                "additionalProperties": False,
            },
            add_task,
        ),
        Tool(
            "list_tasks",
            "List the user's tasks, open ones first; optionally only open or done ones, those "
            "due by a date, or those whose title contains some text.",
            {
                "type": "object",
                "properties": {
                    "done": {"type": "boolean"},
                    "due_before": {"type": "string", "format": "date"},
                    "query": {"type": "string", "maxLength": 200},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                },
                "additionalProperties": False,
            },
            list_tasks,
        ),
        Tool(
            "complete_task",
            "Mark one of the user's tasks done.",
            {
                "type": "object",
                "properties": {"task_id": _TASK_ID},
                "required": ["task_id"],
                "additionalProperties": False,
            },
            complete_task,
        ),
        Tool(
            "update_task",
            "Change the title, notes, due date or done state of one of the user's tasks.",
            {
                "type": "object",
                "properties": {
                    "task_id": _TASK_ID,
                    "title": _TITLE,
                    "notes": _NOTES,
                    "due_date": _DUE,
                    "done": {"type": "boolean"},
                },
                "required": ["task_id"],
                "minProperties": 2,
                "additionalProperties": False,
            },
            update_task,
        ),
        Tool(
            "delete_task",
            "Delete one of the user's tasks.",
            {
                "type": "object",
                "properties": {"task_id": _TASK_ID},
                "required": ["task_id"],
                "additionalProperties": False,
            },
            delete_task,
        ),
    ),
)
