"""Migrations run over a connection handed in by the service, or on their own from the CLI."""

import asyncio
import logging.config

from alembic import context
from sqlalchemy import Connection

from chatbot.chat import idempotency as _idempotency  # noqa: F401
from chatbot.config import Settings
from chatbot.conversations import models as _conversations  # noqa: F401
from chatbot.db import Base, create_engine
from chatbot.messages import models as _messages  # noqa: F401
from chatbot.quotas import models as _quotas  # noqa: F401
from chatbot.tasks import models as _tasks  # noqa: F401

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings().database_url
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_with_own_engine())


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
