"""The processes a benchmark compares, each on a free loopback port, stopped on exit.

- `direct`: the fake OpenAI-compatible upstream (`bench/upstream.py`), one reply shape per model
  name, a wait before the first token;
- `ours-sqlite`, `ours-postgres`: `chatbot serve` relaying to it, JWT on, the rate limit and the
  cap on concurrent replies out of the way (a benchmark's clients are few users sending a lot);
  `ours-sqlite-x2`, `ours-postgres-x2`: the same with two worker processes (`--workers 2`), each
  configuration on a database of its own;
- `litellm`: the LiteLLM proxy from bench/.venv-peers (`make bench-env`) relaying to it, run as
  its documentation says to run it offline, with its access log off as ours is.
"""

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from loadtest import (
    _cpu_seconds,
    _free_ports,
    _migrate,
    _prepare_database,
    _service_env,
    _stop,
    _wait_for_port,
    _wait_ready,
)
from report import LATEST_JSON, LATEST_MARKDOWN, publish

ROOT = Path(__file__).resolve().parents[1]

DIRECT = "direct"
OURS = ("ours-sqlite", "ours-postgres")
LITELLM = "litellm"
PEERS_VENV = ROOT / "bench" / ".venv-peers"
T = TypeVar("T")


@dataclass(frozen=True)
class ReplyShape:
    """What the fake upstream answers to one model name, after its wait for the first token."""

    model: str
    tokens: int
    per_second: float

    def seconds(self, ttft_ms: float) -> float:
        return ttft_ms / 1000 + (self.tokens - 1) / self.per_second

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "tokens": self.tokens, "per_second": self.per_second}


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    pid: int

    def pids(self) -> list[int]:
        """The process and its children (a service's workers)."""
        return [self.pid, *_children(self.pid)]


def is_ours(name: str) -> bool:
    return name.startswith("ours-")


def workers_of(name: str) -> int:
    _, _, suffix = name.rpartition("-x")
    return int(suffix) if suffix.isdigit() else 1


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_children(int(child))]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes have used so far, together."""
    return sum(_cpu_seconds(pid) for pid in pids)


async def wait_quiet(pids: list[int], timeout_s: float = 60) -> bool:
    """Wait until none of the processes uses CPU (what a preparation or a phase left to do,
    titles or a backlog, must not land in the next measurement); False if they never did."""
    deadline = time.monotonic() + timeout_s
    before = [_cpu_seconds(pid) for pid in pids]
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        after = [_cpu_seconds(pid) for pid in pids]
        if all(now - then < 0.05 for now, then in zip(after, before, strict=True)):
            return True
        before = after
    return False


def rotated(items: list[T], shift: int) -> list[T]:
    """`items` starting at `shift` (modulo their number): an order that rotates from round to
    round, so that noise on the shared machine falls on every configuration alike."""
    shift %= len(items)
    return items[shift:] + items[:shift]


class Servers:
    """`with Servers(...) as servers:` starts the named servers (the upstream always) and
    waits until each answers; leaving the block stops them."""

    def __init__(
        self,
        workdir: Path,
        names: list[str],
        shapes: list[ReplyShape],
        ttft_ms: float,
        database_url: str,
        pg_database: str,
        peers_venv: Path = PEERS_VENV,
    ) -> None:
        self.workdir, self.names, self.shapes, self.ttft_ms = workdir, names, shapes, ttft_ms
        self.database_url, self.pg_database, self.peers_venv = (
            database_url,
            pg_database,
            peers_venv,
        )
        self.jwt_secret = secrets.token_urlsafe(48)
        self.master_key = "sk-bench-" + secrets.token_hex(16)
        self.servers: dict[str, Server] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = contextlib.ExitStack()

    def __enter__(self) -> "Servers":
        litellm = self.peers_venv / "bin" / "litellm"
        if LITELLM in self.names and not litellm.exists():
            raise SystemExit(f"{litellm} is missing: run `make bench-env` first")
        ours = [name for name in self.names if is_ours(name)]
        everyone = [DIRECT, *ours, LITELLM]
        ports = dict(zip(everyone, _free_ports(len(everyone)), strict=True))
        try:
            self._start(DIRECT, ports[DIRECT], self._upstream_command(ports[DIRECT]), ROOT)
            for name in ours:
                env = self._service_env(name, ports[name], ports[DIRECT])
                _migrate(env)
                command = [sys.executable, "-m", "chatbot", "serve"]
                self._start(name, ports[name], command, ROOT, env)
            if LITELLM in self.names:
                command = [str(litellm), *self._litellm_options(ports[LITELLM], ports[DIRECT])]
                self._start(LITELLM, ports[LITELLM], command, self.workdir, self._litellm_env())
            _wait_for_port(ports[DIRECT], self._processes[DIRECT], "the fake upstream")
            for name in ours:
                _wait_ready(f"http://127.0.0.1:{ports[name]}", self._processes[name])
            if LITELLM in self._processes:
                _wait_http(
                    f"http://127.0.0.1:{ports[LITELLM]}/health/liveliness",
                    self._processes[LITELLM],
                    "LiteLLM",
                    120,
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for process in self._processes.values():
            _stop(process, grace_seconds=15)
        self._logs.close()

    def check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} during the run")

    def litellm_version(self) -> str | None:
        if LITELLM not in self.servers:
            return None
        return subprocess.run(  # noqa: S603
            [
                self.peers_venv / "bin" / "python",
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def _start(
        self,
        name: str,
        port: int,
        command: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        log = self._logs.enter_context((self.workdir / f"{name}.log").open("wb"))
        process = subprocess.Popen(  # noqa: S603
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        )
        self._processes[name] = process
        self.servers[name] = Server(name, port, process.pid)

    def _upstream_command(self, port: int) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "bench" / "upstream.py"),
            f"--port={port}",
            f"--ttft-ms={self.ttft_ms}",
            *(f"--reply={s.model}:{s.tokens}:{s.per_second:g}" for s in self.shapes),
        ]

    def _service_env(self, name: str, port: int, upstream_port: int) -> dict[str, str]:
        if "sqlite" in name:
            database_url = f"sqlite+aiosqlite:///{self.workdir}/{name}.db"
        else:
            workers = workers_of(name)
            database = self.pg_database if workers == 1 else f"{self.pg_database}_x{workers}"
            database_url = asyncio.run(_prepare_database(self.database_url, database, self.workdir))
        return _service_env(database_url, upstream_port, port, self.jwt_secret, "WARNING") | {
            "CHATBOT_MODEL": self.shapes[0].model,
            "CHATBOT_WORKERS": str(workers_of(name)),
            "CHATBOT_RATE_LIMIT": "1000000/minute",
            "CHATBOT_MAX_CONCURRENT_REPLIES": "1000",
            # Plain chat, as the peer relays it: offering the task tools (the default) adds
            # their definitions to every request, which the peer's requests do not carry.
            "CHATBOT_DEFAULT_TOOLSETS": "[]",
        }

    def _litellm_options(self, port: int, upstream_port: int) -> list[str]:
        """Its config (JSON is YAML): each model name to the upstream's model of that name."""
        config = self.workdir / "litellm.yaml"
        config.write_text(
            json.dumps(
                {
                    "model_list": [
                        {
                            "model_name": shape.model,
                            "litellm_params": {
                                "model": f"openai/{shape.model}",
                                "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                                "api_key": "bench",
                            },
                        }
                        for shape in self.shapes
                    ]
                },
                indent=2,
            )
        )
        logging_config = self.workdir / "litellm-logging.json"
        logging_config.write_text(
            json.dumps(
                {
                    "version": 1,
                    "disable_existing_loggers": False,
                    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
                    "loggers": {
                        name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                        for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
                    },
                }
            )
        )
        return [
            f"--config={config}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--log_config={logging_config}",
        ]

    def _litellm_env(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("CHATBOT_", "OPENAI_", "DATABASE_", "REDIS_", "LITELLM_"))
        }
        env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=self.master_key)
        return env


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} during start-up")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready")


def comma_list(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [convert(item) for item in text.split(",") if item]


def scenario_parser(
    doc: str | None, pg_database: str, targets: list[str]
) -> argparse.ArgumentParser:
    """The options of every scenario that starts servers: where PostgreSQL is, which
    configurations run (`direct` always does, see `parse_scenario_args`), where results go."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server on which the configurations' databases are dropped and created",
    )
    parser.add_argument("--pg-database", default=pg_database)
    parser.add_argument(
        "--targets",
        type=comma_list(str),
        default=targets,
        help=f"which of {', '.join(targets)} (direct is always on)",
    )
    parser.add_argument("--output", type=Path, default=LATEST_JSON)
    parser.add_argument("--markdown", type=Path, default=LATEST_MARKDOWN)
    parser.add_argument("--keep", action="store_true", help="keep the logs and SQLite files")
    return parser


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
