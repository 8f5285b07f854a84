"""What every scenario that starts servers has in common: its options, its run in a work
directory of its own, the order in which it goes round its configurations."""

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .litellm import PEERS_VENV
from .report import LATEST_JSON, LATEST_MARKDOWN, publish
from .servers import DIRECT

T = TypeVar("T")


def comma_list(convert: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An option's type: `a,b,c`, each item converted."""
    return lambda text: [convert(item) for item in text.split(",") if item]


def rotated(items: list[T], shift: int) -> list[T]:
    """`items` starting at `shift` (modulo their number): an order that rotates from round to
    round, so that noise on the shared machine falls on every configuration alike."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A scenario's parser, its docstring (with its example commands) as the help's text."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_result_options(parser: argparse.ArgumentParser) -> None:
    """Where a scenario writes its part of the results (both default to bench/results)."""
    parser.add_argument("--output", type=Path, default=LATEST_JSON)
    parser.add_argument("--markdown", type=Path, default=LATEST_MARKDOWN)


def scenario_parser(
    doc: str | None, pg_database: str, targets: list[str] | None
) -> argparse.ArgumentParser:
    """The options of every scenario that starts servers: where PostgreSQL is, which
    configurations run (`direct` always does, see `parse_scenario_args`; no `--targets` for a
    scenario whose configurations are fixed, `targets=None`), where results go."""
    parser = script_parser(doc)
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server on which the configurations' databases are dropped and created",
    )
    parser.add_argument("--pg-database", default=pg_database)
    if targets is not None:
        parser.add_argument(
            "--targets",
            type=comma_list(str),
            default=targets,
            help=f"which of {', '.join(targets)} (direct is always on)",
        )
    add_result_options(parser)
    parser.add_argument("--keep", action="store_true", help="keep the logs and SQLite files")
    return parser


def add_streaming_options(parser: argparse.ArgumentParser) -> None:
    """The options of a scenario that streams through ours and LiteLLM: the upstream's wait
    before the first token, and where LiteLLM is installed."""
    parser.add_argument("--ttft-ms", type=float, default=50, help="the upstream's wait")
    parser.add_argument("--peers-venv", type=Path, default=PEERS_VENV)


def parse_scenario_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if DIRECT not in args.targets:
        args.targets.insert(0, DIRECT)
    return args


def run_scenario(
    key: str,
    workdir_prefix: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Path], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, Any], Path]:
    """`run(args, workdir)` in a new work directory (the servers' logs and SQLite files), timed
    into the result's `wall_s`; writes the result under `key` to `--output` and `--markdown`
    and prints its Markdown. Returns the result and the work directory, left to the caller to
    keep or remove."""
    workdir = Path(tempfile.mkdtemp(prefix=f"chatbot-{workdir_prefix}-"))
    started = time.monotonic()
    result = run(args, workdir)
    result["wall_s"] = round(time.monotonic() - started, 1)
    text = markdown(result)
    publish(key, result, text, args.output, args.markdown)
    print(text)
    return result, workdir


def finish(workdir: Path, keep: bool, failure: str | None = None) -> None:
    """The end of a run: on `failure`, say so and exit non-zero with the logs kept; else remove
    the work directory, unless `--keep` asked for it."""
    if failure:
        print(f"FAILED: {failure}; logs kept in {workdir}", file=sys.stderr)
        sys.exit(1)
    if keep:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
