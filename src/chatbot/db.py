"""Database engine, session factory, declarative base and migrations."""

import functools
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    MetaData,
    TypeDecorator,
    bindparam,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import ClassManager, DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONVariant = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


async def take_turns(session: AsyncSession, key: str) -> None:
    """From here until the transaction ends, transactions that take the same `key` run one
    after another: a transaction-scoped advisory lock on PostgreSQL. SQLite has one writer: a
    transaction that has written holds every other write off until it ends, so there the
    caller writes before it reads what it decides on."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_advisory_lock, {"key": key})


_advisory_lock = select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("key"), 0)))


def changed_rows(result: object) -> int:
    """Rows an UPDATE or DELETE changed (the typed Result does not name `rowcount`)."""
    return int(getattr(result, "rowcount", 0) or 0)


_TRANSIENT_SQLSTATES = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01")
"""PostgreSQL classes and codes worth a retry: connection exceptions, insufficient resources
(too many connections), a server shutting down or starting up, and a transaction rolled back
for a conflict (serialization failure, deadlock)."""
_TRANSIENT_SQLITE = {5, 6, 10, 13, 14}
"""SQLite's busy, locked, I/O error, full and cannot-open: the file, not the statement."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether a failure says the database could not be reached or could not take the work
    just now (refused, dropped, timed out, busy, restarting) rather than that a statement or
    its values were wrong: the one is worth a retry, the other is not."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate.startswith(_TRANSIENT_SQLSTATES)
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in _TRANSIENT_SQLITE
        return isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, OSError | TimeoutError | PoolTimeout)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


_Model = TypeVar("_Model", bound="Base")


@functools.cache
def _manager(model: type["Base"]) -> ClassManager[Any]:
    return cast(ClassManager[Any], inspect(model).class_manager)


def detached(model: type[_Model], values: Mapping[str, Any]) -> _Model:
    """A `model` instance holding `values`, in no session, for rows that are only read: built
    as the ORM builds the rows it loads, without the attribute event its constructor fires for
    each value (about 1 us instead of 12 to 20 for a message or a conversation). An attribute
    not given reads None. Never add one to a session: it would be inserted again."""
    instance = cast(_Model, _manager(model).new_instance())
    instance.__dict__.update(values)
    return instance


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 20,
    pool_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    statement_timeout: float | None = None,
) -> AsyncEngine:
    """An engine whose pool is sized by settings; waiting longer than `pool_timeout` for a
    connection raises, and is answered 503 rather than left to pile up. On PostgreSQL a
    connection must open within `connect_timeout`, and each statement answer within
    `statement_timeout` (None: no bound, for migrations), so a server that went silent, as
    behind a network partition, costs a bounded wait."""
    options: dict[str, Any] = {
        # A failed statement's message would carry its parameters (message text, prompts):
        # they must not reach a log.
        "hide_parameters": True,
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
    }
    if database_url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    else:
        options["pool_recycle"] = 1800
        options["connect_args"] = {"timeout": connect_timeout, "command_timeout": statement_timeout}
    engine = create_async_engine(database_url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
    else:
        _ping_when_idle(engine)
    return engine


PING_AFTER_IDLE_SECONDS = 1.0
"""A pooled connection unused this long is pinged before it is handed out; one back in the pool
for less is not."""


def _ping_when_idle(engine: AsyncEngine) -> None:
    """A server can restart under us; a file cannot. SQLAlchemy's `pool_pre_ping` pings every
    checkout, three round trips on asyncpg (BEGIN, a statement, ROLLBACK), twice a turn. Here
    only a connection that sat idle is pinged, where a restart or a dropped connection would
    have hit it: one in steady use that turns out dead fails its statement, which marks the
    whole pool stale (SQLAlchemy invalidates every connection made before a disconnect), and
    the request is answered `503 database_unavailable` with Retry-After."""
    pool = engine.sync_engine.pool
    dialect = engine.dialect

    def fresh(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool drops this connection and checks out another (up to three tries).
            raise DisconnectionError("the pooled connection is gone") from exc

    event.listen(pool, "connect", fresh)
    event.listen(pool, "checkin", fresh)
    event.listen(pool, "checkout", ping_if_idle)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys (for ON DELETE CASCADE) are off by default in SQLite; WAL lets readers
    # proceed while a reply is being stored.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def alembic_config(database_url: str | None = None) -> Config:
    """Find the migration scripts whether running from a checkout or an installed wheel."""
    packaged = Path(__file__).parent / "alembic"
    checkout = Path(__file__).resolve().parents[2] / "alembic"
    script_location = packaged if packaged.is_dir() else checkout
    config = Config()
    config.set_main_option("script_location", str(script_location))
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _upgrade(connection: Connection, config: Config) -> None:
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the latest revision over the service's own engine."""
    config = alembic_config()
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, config)
