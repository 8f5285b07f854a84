"""The processes a benchmark compares, each on a free loopback port, stopped on exit.

- `direct`: the fake OpenAI-compatible upstream (`harness/upstream.py`), one reply shape per
  model name, a wait before the first token;
- `ours-sqlite`, `ours-postgres`: `chatbot serve` relaying to it, JWT on; by default with the
  rate limit and the cap on concurrent replies out of the way (a benchmark's clients are few
  users sending a lot), `service_settings={}` keeps the service's own defaults (the load test);
  `ours-sqlite-x2`, `ours-postgres-x2`: the same with two worker processes (`--workers 2`),
  each configuration on a database of its own;
- `lean-sqlite-aiohttp`, `lean-postgres-aiohttp`: the lean reference server (`bench/lean.py`),
  the floor ours is held against: the essential work of a turn in our API's shapes, one
  worker, JWT on with the same secret, each on a database of its own, reading the upstream
  through aiohttp as ours does; `lean-sqlite`, `lean-postgres`: the same through httpx2 (the
  `openai` client's default transport, which ours used before); `lean-postgres-decoupled-aiohttp`
  produces each reply in a task of its own that the response follows (`--decoupled`);
- `litellm`: the LiteLLM proxy (`harness/litellm.py`) relaying to it;
- a `redis-server` of the scenario's own (`RedisServer`), for instances of ours that share it.
"""

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .databases import SQLITE, prepare_database
from .litellm import PEERS_VENV, litellm_env, litellm_executable, litellm_options, litellm_version
from .processes import children, free_ports, stop, wait_for_http, wait_for_port
from .upstream import UTILITY_MODEL, ReplyShape

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SCRIPT = Path(__file__).resolve().with_name("upstream.py")
LEAN_SCRIPT = Path(__file__).resolve().parents[1] / "lean.py"

DIRECT = "direct"
OURS = ("ours-sqlite", "ours-postgres")
LEAN = ("lean-sqlite", "lean-postgres")
LITELLM = "litellm"


@dataclass(frozen=True)
class Server:
    """A started server: its configuration's name, its port and its main process."""

    name: str
    port: int
    pid: int

    def pids(self) -> list[int]:
        """The process and its children (a service's workers)."""
        return [self.pid, *children(self.pid)]


def is_ours(name: str) -> bool:
    """Our service (`chatbot serve`): its settings, migrations and workers."""
    return name.startswith("ours-")


def is_lean(name: str) -> bool:
    """The lean reference server (`bench/lean.py`)."""
    return name.startswith("lean-")


def speaks_ours(name: str) -> bool:
    """A server of our API (conversations, SSE events): ours or the lean one."""
    return is_ours(name) or is_lean(name)


def lean_peer(name: str) -> str | None:
    """The lean configuration one of ours is held against: the same database and transport,
    one worker (`ours-postgres` -> `lean-postgres-aiohttp`); None for a configuration of more
    workers or none of ours."""
    if not is_ours(name) or workers_of(name) != 1:
        return None
    return f"lean-{name.removeprefix('ours-')}-aiohttp"


def workers_of(name: str) -> int:
    """The worker processes of a configuration: `ours-postgres-x2` has two."""
    _, _, suffix = name.rpartition("-x")
    return int(suffix) if suffix.isdigit() else 1


def service_env(
    database_url: str, upstream_port: int, port: int, jwt_secret: str | None, log_level: str
) -> dict[str, str]:
    """The environment of `chatbot serve` on a loopback port, relaying to the fake upstream on
    `upstream_port`, JWT on with `jwt_secret` (off without one); a Redis of this environment is
    left out."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CHATBOT_AUTO_MIGRATE": "false",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "OPENAI_API_KEY": "bench",
        "CHATBOT_UTILITY_MODEL": UTILITY_MODEL,
        "CHATBOT_HOST": "127.0.0.1",
        "CHATBOT_PORT": str(port),
        "CHATBOT_LOG_LEVEL": log_level,
    }
    if jwt_secret is None:
        env["CHATBOT_AUTH"] = "none"
    else:
        env.update(CHATBOT_AUTH="jwt", CHATBOT_JWT_SECRET=jwt_secret)
    env.pop("REDIS_URL", None)
    return env


def benchmark_settings(model: str) -> dict[str, str]:
    """What the service runs with in the benchmarks that compare it: `model` by default, and
    limits that would otherwise measure themselves out of the way."""
    return {
        "CHATBOT_MODEL": model,
        "CHATBOT_RATE_LIMIT": "1000000/minute",
        "CHATBOT_MAX_CONCURRENT_REPLIES": "1000",
        # Plain chat, as the peer relays it: offering the task tools (the default) adds their
        # definitions to every request, which the peer's requests do not carry.
        "CHATBOT_DEFAULT_TOOLSETS": "[]",
    }


def migrate(env: dict[str, str]) -> None:
    """`chatbot migrate` on the database of `env`, before the service starts."""
    subprocess.run(
        [sys.executable, "-m", "chatbot", "migrate"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def start_service(
    env: dict[str, str], output: IO[bytes] | None = None, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """`chatbot serve` with the environment `env`, under cProfile when `profile` names the
    file for its stats (cProfile writes them on SIGINT, not when SIGTERM ends the process)."""
    command = [sys.executable, "-m", "chatbot", "serve"]
    if profile is not None:
        command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    return subprocess.Popen(  # noqa: S603
        command, env=env, stdout=output, stderr=subprocess.STDOUT if output else None, cwd=ROOT
    )


class Servers:
    """`with Servers(...) as servers:` starts the named servers (the upstream always) and
    waits until each answers; leaving the block stops them, the upstream last. Each one's
    output goes to `<name>.log` in `workdir`. With `shared_database`, ours are instances of
    one service, as behind a load balancer: all on the first one's database, migrated once."""

    def __init__(
        self,
        workdir: Path,
        names: list[str],
        shapes: list[ReplyShape],
        ttft_ms: float,
        database_url: str,
        pg_database: str,
        peers_venv: Path = PEERS_VENV,
        *,
        service_settings: dict[str, str] | None = None,
        log_level: str = "WARNING",
        service_profile: Path | None = None,
        shared_database: bool = False,
    ) -> None:
        self.workdir, self.names, self.shapes, self.ttft_ms = workdir, names, shapes, ttft_ms
        self.database_url, self.pg_database, self.peers_venv = (
            database_url,
            pg_database,
            peers_venv,
        )
        self.service_settings = (
            benchmark_settings(shapes[0].model) if service_settings is None else service_settings
        )
        self.log_level, self.service_profile = log_level, service_profile
        self.shared_database = shared_database
        self.jwt_secret = secrets.token_urlsafe(48)
        self.master_key = "sk-bench-" + secrets.token_hex(16)
        self.servers: dict[str, Server] = {}
        self.database_urls: dict[str, str] = {}
        """The database each of ours (and each lean one) runs on, as the service names it."""
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = contextlib.ExitStack()

    def __enter__(self) -> "Servers":
        litellm = litellm_executable(self.peers_venv) if LITELLM in self.names else None
        ours = [name for name in self.names if is_ours(name)]
        lean = [name for name in self.names if is_lean(name)]
        everyone = [DIRECT, *ours, *lean, LITELLM]
        ports = dict(zip(everyone, free_ports(len(everyone)), strict=True))
        try:
            upstream = [
                sys.executable,
                str(UPSTREAM_SCRIPT),
                f"--port={ports[DIRECT]}",
                f"--ttft-ms={self.ttft_ms}",
                *(shape.option() for shape in self.shapes),
            ]
            self._start(DIRECT, ports[DIRECT], upstream, ROOT)
            shared: str | None = None
            for name in ours:
                env = self._service_env(name, ports[name], ports[DIRECT], shared)
                if shared is None:
                    migrate(env)
                if self.shared_database:
                    shared = env["DATABASE_URL"]
                process = start_service(env, self._log(name), self.service_profile)
                self._started(name, ports[name], process)
            for name in lean:
                self._start(name, ports[name], self._lean_command(name, ports), ROOT)
            if litellm is not None:
                options = litellm_options(self.workdir, ports[LITELLM], ports[DIRECT], self.shapes)
                env = litellm_env(self.master_key)
                self._start(LITELLM, ports[LITELLM], [str(litellm), *options], self.workdir, env)
            wait_for_port(ports[DIRECT], self._processes[DIRECT], "the fake upstream")
            for name in [*ours, *lean]:
                url = f"http://127.0.0.1:{ports[name]}/readyz"
                wait_for_http(url, self._processes[name], name, 60)
            if LITELLM in self._processes:
                url = f"http://127.0.0.1:{ports[LITELLM]}/health/liveliness"
                wait_for_http(url, self._processes[LITELLM], "LiteLLM", 120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The upstream last: a service stopping while it still relays should not log errors.
        for name, process in reversed(self._processes.items()):
            profiled = self.service_profile is not None and is_ours(name)
            stop(process, 15, signal.SIGINT if profiled else signal.SIGTERM)
        self._logs.close()

    def exit_code(self, name: str) -> int | None:
        """The server's exit code if it has exited, None while it runs."""
        return self._processes[name].poll()

    def check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} during the run")

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def litellm_version(self) -> str | None:
        return litellm_version(self.peers_venv) if LITELLM in self.servers else None

    def _log(self, name: str) -> IO[bytes]:
        return self._logs.enter_context(self.log_path(name).open("wb"))

    def _start(
        self,
        name: str,
        port: int,
        command: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        process = subprocess.Popen(  # noqa: S603
            command, env=env, stdout=self._log(name), stderr=subprocess.STDOUT, cwd=cwd
        )
        self._started(name, port, process)

    def _started(self, name: str, port: int, process: subprocess.Popen[bytes]) -> None:
        self._processes[name] = process
        self.servers[name] = Server(name, port, process.pid)

    def _lean_command(self, name: str, ports: dict[str, int]) -> list[str]:
        """`bench/lean.py` on a database of its own, created afresh like ours'."""
        target = SQLITE if SQLITE in name else self.database_url
        database = f"{self.pg_database}_{name.replace('-', '_')}"
        database_url = asyncio.run(prepare_database(target, database, self.workdir, name))
        self.database_urls[name] = database_url
        return [
            sys.executable,
            str(LEAN_SCRIPT),
            f"--port={ports[name]}",
            f"--database-url={database_url}",
            f"--upstream-url=http://127.0.0.1:{ports[DIRECT]}/v1",
            f"--jwt-secret={self.jwt_secret}",
            f"--client={'aiohttp' if name.endswith('-aiohttp') else 'httpx'}",
            f"--model={self.shapes[0].model}",
            *(["--decoupled"] if "-decoupled" in name else []),
        ]

    def _service_env(
        self, name: str, port: int, upstream_port: int, database_url: str | None = None
    ) -> dict[str, str]:
        """On `database_url` when given (another instance's), else on a database of its own,
        created afresh."""
        workers = workers_of(name)
        if database_url is None:
            database = self.pg_database if workers == 1 else f"{self.pg_database}_x{workers}"
            target = SQLITE if SQLITE in name else self.database_url
            database_url = asyncio.run(prepare_database(target, database, self.workdir, name))
        self.database_urls[name] = database_url
        env = service_env(database_url, upstream_port, port, self.jwt_secret, self.log_level)
        return env | {"CHATBOT_WORKERS": str(workers)} | self.service_settings


class RedisServer:
    """`with RedisServer(workdir) as redis:` starts a redis-server of the scenario's own on a
    free loopback port, never the machine's (whose data and clients are not the benchmark's),
    keeping nothing on disk (`--save ""`, `--appendonly no`); leaving the block stops it.
    `redis.url` is what REDIS_URL says, `redis.pid` the process whose CPU counts; its output
    goes to `redis.log` in `workdir`."""

    def __init__(self, workdir: Path, executable: str = "redis-server") -> None:
        self.workdir, self.executable = workdir, executable
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._logs = contextlib.ExitStack()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None, "the Redis server is not started"
        return self._process.pid

    def __enter__(self) -> "RedisServer":
        executable = shutil.which(self.executable)
        if executable is None:
            raise RuntimeError(f"{self.executable} is not installed")
        (self.port,) = free_ports(1)
        log = self._logs.enter_context((self.workdir / "redis.log").open("wb"))
        command = [executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self._process = subprocess.Popen(  # noqa: S603
            command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        try:
            wait_for_port(self.port, self._process, "redis-server")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop(self._process, 10)
        self._logs.close()
