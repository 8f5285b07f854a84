"""`chatbot serve [--host H] [--port P] [--workers N] | migrate | mcp | token USER | --version`."""

import argparse
import asyncio
import functools
import gc
import logging
import os
import re
import secrets
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from pydantic import ValidationError

from chatbot.config import ConfigError, Settings
from chatbot.logs import quiet_libraries

if TYPE_CHECKING:
    from fastapi import FastAPI


SHOWN_QUERY_PARAMETERS = frozenset({"limit", "cursor", "stream", "starting_after", "model"})
"""The query parameters the access log shows: those that can carry no secret and no message
text. Every other value is redacted, whatever its name (`access_token`, `token`, `content`,
`idempotency_key`, or any name a client makes up)."""


_SHOWN_VALUE = re.compile(r"[A-Za-z0-9_.:/@+=-]{0,600}")


def redact_query(target: str) -> str:
    """A request target with the values of its query redacted, but for the parameters shown.
    Names are compared as the application reads them, percent-decoded (`+` a space), so
    `?access_tok%65n=` is redacted like `?access_token=`; a shown name's value is shown only
    when it holds nothing but the characters such values are made of (no `;`, `?`, space...)."""
    path, question, query = target.partition("?")
    if not question:
        return target
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if unquote_plus(name) in SHOWN_QUERY_PARAMETERS and _SHOWN_VALUE.fullmatch(value):
            pairs.append(pair)
        elif equals:
            pairs.append(f"{name}=[redacted]" if value else pair)
        elif pair:
            pairs.append("[redacted]")  # a bare value: it could be anything
        else:
            pairs.append(pair)
    return f"{path}?{'&'.join(pairs)}"


class RedactTokens(logging.Filter):
    """Keep what rides in URLs (tokens, message text) out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query(arg) if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, RedactTokens) for existing in access.filters):
        access.addFilter(RedactTokens())
    # Alembic announces each of its plugins at INFO; only the revisions it applies are news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    quiet_libraries()


def worker_app() -> "FastAPI":
    """The app of one worker process (`uvicorn --factory`): a process of its own, so it reads
    the settings and sets up logging itself."""
    from chatbot.app import create_app

    settings = Settings()
    configure_logging(settings)
    return _settled(create_app(settings))


def _settled(app: "FastAPI") -> "FastAPI":
    """The app, with what the process built to serve it (modules, models, routes: some 180,000
    objects that live as long as it) moved out of the garbage collector's way: a full
    collection walked them all, about 90 ms here, a pause for every stream of the process.
    Only `chatbot serve` does this: it owns the process."""
    gc.collect()
    gc.freeze()
    return app


def _serve(settings: Settings) -> None:
    import uvicorn

    from chatbot.app import create_app
    from chatbot.serving import ConnectionGuard, GuardedHttpProtocol, raise_file_limit

    raise_file_limit(settings.max_connections)
    guard = ConnectionGuard(
        header_timeout=settings.header_timeout_seconds,
        max_connections=settings.max_connections,
        send_timeout=settings.sse_send_timeout,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": 30,
        # A partial of a module-level class, so that it pickles to each worker process.
        "http": functools.partial(GuardedHttpProtocol, guard=guard),
    }
    if settings.workers == 1:
        uvicorn.run(_settled(create_app(settings)), **options)
        return
    settings.check_startup()
    if settings.should_auto_migrate:
        # Once, here, rather than by every worker at once.
        _migrate(settings)
        os.environ["CHATBOT_AUTO_MIGRATE"] = "false"
    if settings.jwt_secret is None and settings.stream_token_secret is None:
        # A stream URL one worker hands out must open on any of them.
        os.environ["CHATBOT_STREAM_TOKEN_SECRET"] = secrets.token_urlsafe(32)
    # Each worker has its own registry of running replies; a stream asked of another worker
    # is followed through the database, as it would be on another instance.
    uvicorn.run("chatbot.cli:worker_app", factory=True, workers=settings.workers, **options)


def _migrate(settings: Settings) -> None:
    from chatbot.db import create_engine, migrate

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("database is at the latest revision")


def _mcp(settings: Settings, *, http: bool) -> None:
    from chatbot.tasks.mcp_server import serve_http, serve_stdio

    asyncio.run(serve_http(settings) if http else serve_stdio(settings))


def _token(settings: Settings, user_id: str, ttl_seconds: int) -> None:
    from chatbot.auth.tokens import issue_token
    from chatbot.ids import is_user_id

    if settings.jwt_secret is None:
        raise ConfigError("CHATBOT_JWT_SECRET is not set: there is nothing to sign the token with")
    if not is_user_id(user_id):
        raise ConfigError("a user id is 1 to 255 printable characters, no space at either end")
    print(issue_token(settings, user_id, ttl_seconds=ttl_seconds))


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError("a whole number from 1 to 64")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("a port number from 0 to 65535")
    return int(text)


def _host(text: str) -> str:
    if (
        not text
        or len(text) > 253
        or any(char.isspace() or not char.isprintable() for char in text)
    ):
        raise argparse.ArgumentTypeError("a host name or address")
    return text


SERVE_OPTIONS = {"host": "CHATBOT_HOST", "port": "CHATBOT_PORT", "workers": "CHATBOT_WORKERS"}
"""`chatbot serve` options and the settings they stand for."""


def invalid_settings(exc: ValidationError) -> str:
    """Which settings are wrong and why, never their values (one may be a secret)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)
    ]
    return "invalid settings (CHATBOT_<NAME>, or as documented): " + "; ".join(problems)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("chatbot")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP service")
    serve.add_argument(
        "--host", type=_host, help="address to listen on (default: CHATBOT_HOST, else 127.0.0.1)"
    )
    serve.add_argument("--port", type=_port, help="port (default: CHATBOT_PORT, else 8000)")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="worker processes, 1 to 64 (default: CHATBOT_WORKERS, else 1)",
    )
    commands.add_parser("migrate", help="apply database migrations")
    mcp = commands.add_parser(
        "mcp", help="serve the task tools over MCP: stdio (default) or streamable HTTP"
    )
    mcp.add_argument(
        "--http",
        action="store_true",
        help="streamable HTTP at http://CHATBOT_HOST:CHATBOT_MCP_PORT/mcp, Bearer JWT per request",
    )
    token = commands.add_parser("token", help="print a JWT for local testing")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    args = parser.parse_args(argv)

    for option, variable in SERVE_OPTIONS.items():
        # The command line wins over the environment; set there, every worker process sees it.
        if (value := getattr(args, option, None)) is not None:
            os.environ[variable] = str(value)
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"chatbot: {invalid_settings(exc)}")
    configure_logging(settings)
    try:
        if args.command == "serve":
            _serve(settings)
        elif args.command == "migrate":
            _migrate(settings)
        elif args.command == "mcp":
            _mcp(settings, http=args.http)
        else:
            _token(settings, args.user_id, args.ttl)
    except ConfigError as exc:
        sys.exit(f"chatbot: {exc}")
