"""A user's tasks. Every function takes the user it acts for: no query here reaches past it."""

import uuid
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.db import utcnow
from chatbot.tasks.models import Task


async def add(
    session: AsyncSession,
    user_id: str,
    title: str,
    *,
    notes: str | None = None,
    due_date: date | None = None,
) -> Task:
    now = utcnow()
    task = Task(
        id=uuid.uuid4(),
        user_id=user_id,
        title=title,
        notes=notes,
        done=False,
        due_date=due_date,
        created_at=now,
        updated_at=now,
    )
    session.add(task)
    await session.flush()
    return task


async def list_tasks(
    session: AsyncSession,
    user_id: str,
    *,
    done: bool | None = None,
    due_before: date | None = None,
    query: str | None = None,
    limit: int = 50,
) -> list[Task]:
    """Open tasks before done ones, each group oldest first."""
    statement = select(Task).where(Task.user_id == user_id)
    if done is not None:
        statement = statement.where(Task.done == done)
    if due_before is not None:
        statement = statement.where(Task.due_date.is_not(None), Task.due_date <= due_before)
    if query:
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        statement = statement.where(Task.title.ilike(pattern, escape="\\"))
    statement = statement.order_by(Task.done, Task.created_at, Task.id).limit(limit)
    return list(await session.scalars(statement))


async def get_owned(session: AsyncSession, user_id: str, task_id: uuid.UUID) -> Task | None:
    return await session.scalar(select(Task).where(Task.id == task_id, Task.user_id == user_id))


async def update(
    session: AsyncSession, user_id: str, task_id: uuid.UUID, changes: dict[str, Any]
) -> Task | None:
    """Apply `changes` (title, notes, due_date, done) to the user's task; None if it has none."""
    task = await get_owned(session, user_id, task_id)
    if task is None:
        return None
    now = utcnow()
    for name in ("title", "notes", "due_date"):
        if name in changes:
            setattr(task, name, changes[name])
    if "done" in changes and bool(changes["done"]) != task.done:
        task.done = bool(changes["done"])
        task.completed_at = now if task.done else None
    task.updated_at = now
    await session.flush()
    return task


async def delete(session: AsyncSession, user_id: str, task_id: uuid.UUID) -> Task | None:
    task = await get_owned(session, user_id, task_id)
    if task is not None:
        await session.delete(task)
        await session.flush()
    return task
