"""The fixtures live in `tests/support.py`, beside the helpers the tests use with them."""

from tests.support import (  # noqa: F401  (pytest finds fixtures by name in this module)
    clean_environment,
    database_url,
    make_settings,
    postgres_url,
    redis_server,
    service,
    sessionmaker,
    start_service,
    upstream,
)
