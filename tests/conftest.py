"""The fixtures live in `tests/support.py`, beside the helpers the tests use with them."""

from collections import Counter
from typing import Any

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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Why tests were skipped, one line per reason with how many it skipped: a run without
    PostgreSQL or Chromium says so instead of passing quietly on less."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped tests, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:5d}  {reason}")
