"""The database a benchmarked service runs on: a new SQLite file, or a PostgreSQL database
dropped and created afresh on the server a scenario is given.

Only the databases a scenario names (its `--pg-database`, or one derived from it) are dropped:
the server's other databases are left alone.
"""

from pathlib import Path

import asyncpg
from sqlalchemy import make_url

SQLITE = "sqlite"
"""What a scenario's `--database` option says for SQLite, instead of a PostgreSQL server URL."""


def sqlite_url(workdir: Path, name: str) -> str:
    """The service's URL of a SQLite file `name`.db in the work directory."""
    return f"sqlite+aiosqlite:///{workdir}/{name}.db"


async def recreate_postgres_database(server_url: str, database: str) -> str:
    """Drop `database` on the server (its connections too) and create it empty; returns the
    service's URL of it."""
    url = make_url(server_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(admin)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    service_url = url.set(drivername="postgresql+asyncpg", database=database)
    return service_url.render_as_string(hide_password=False)


async def prepare_database(target: str, pg_database: str, workdir: Path, sqlite_name: str) -> str:
    """`target` is `sqlite` (a new file `sqlite_name`.db in `workdir`) or a PostgreSQL server
    URL (on which `pg_database` is recreated); returns the service's database URL."""
    if target == SQLITE:
        return sqlite_url(workdir, sqlite_name)
    return await recreate_postgres_database(target, pg_database)


def database_kind(target: str) -> str:
    """`sqlite` or `postgresql`: how results name the database of a `--database` option."""
    return SQLITE if target == SQLITE else "postgresql"
