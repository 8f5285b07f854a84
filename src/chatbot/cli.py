"""`chatbot serve | migrate | token USER`."""

import argparse
import asyncio
import logging
import re
import sys

from chatbot.config import ConfigError, Settings


class RedactTokens(logging.Filter):
    """Keep what rides in URLs (tokens, message text) out of the access log."""

    _TOKEN = re.compile(r"((?:access_)?token=|content=)[^&\s]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._TOKEN.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def _serve(settings: Settings) -> None:
    import uvicorn

    from chatbot.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )


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


def _token(settings: Settings, user_id: str, ttl_seconds: int) -> None:
    from chatbot.auth.tokens import issue_token

    if settings.jwt_secret is None:
        raise ConfigError("CHATBOT_JWT_SECRET is not set: there is nothing to sign the token with")
    print(issue_token(settings, user_id, ttl_seconds=ttl_seconds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the HTTP service")
    commands.add_parser("migrate", help="apply database migrations")
    token = commands.add_parser("token", help="print a JWT for local testing")
    token.add_argument("user_id")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    args = parser.parse_args(argv)

    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    # Alembic announces each of its plugins at INFO; only the revisions it applies are news.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            _serve(settings)
        elif args.command == "migrate":
            _migrate(settings)
        else:
            _token(settings, args.user_id, args.ttl)
    except ConfigError as exc:
        sys.exit(f"chatbot: {exc}")
