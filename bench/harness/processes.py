"""Processes on this machine: ports, start-up, shutdown, and what /proc says about them.

Every reading comes from /proc (Linux only), which costs the measured processes nothing: CPU
seconds from /proc/<pid>/stat, resident sets from /proc/<pid>/status, workers from
/proc/<pid>/task/*/children, and how busy the whole machine was from /proc/stat.
"""

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- ports and start-up


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all held open together while they are picked, or the kernel may
    hand out one port twice, and a client then talks to the upstream, not the service."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    """Until something accepts connections on the loopback `port`, for 30 s at most."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port}")


def wait_for_http(url: str, process: subprocess.Popen[bytes], what: str, seconds: float) -> None:
    """Until a GET of `url` answers 200: listening is not ready (migrations, pools, workers)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} during start-up")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready")


def stop(
    process: subprocess.Popen[bytes] | None,
    grace_seconds: float = 30,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> None:
    """Terminate, then kill what does not stop in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def raise_open_files_limit() -> int:
    """Up to the hard limit: both ends of every stream are sockets on this machine, and the
    servers a scenario starts inherit the limit. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- /proc readings


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (a service's workers, their helpers)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *children(int(child))]
    return found


def is_alive(pid: int) -> bool:
    """True while the process runs: a zombie has exited, whatever its parent has not reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far, together; 0 for one gone."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            # After the command's closing parenthesis, which may itself hold spaces.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` figure from /proc/<pid>/status: VmRSS is the resident set, VmHWM its peak."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def rss_kib(pids: list[int]) -> int:
    """The resident sets of the processes, added up."""
    return sum(status_kib(pid, "VmRSS") or 0 for pid in pids)


async def wait_quiet(pids: list[int], timeout_s: float = 60) -> bool:
    """Wait until none of the processes uses CPU (what a preparation or a phase left to do,
    titles or a backlog, must not land in the next measurement); False if they never did."""
    deadline = time.monotonic() + timeout_s
    before = [cpu_seconds([pid]) for pid in pids]
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        after = [cpu_seconds([pid]) for pid in pids]
        if all(now - then < 0.05 for now, then in zip(after, before, strict=True)):
            return True
        before = after
    return False


class MachineLoad:
    """How busy the whole machine and this client were over a stretch: the noise around it."""

    def __init__(self) -> None:
        self.started, self.stat, self.client = (
            time.monotonic(),
            _machine_ticks(),
            time.process_time(),
        )

    def report(self) -> dict[str, float]:
        seconds = time.monotonic() - self.started
        stat = _machine_ticks()
        busy, steal = (stat[key] - self.stat[key] for key in ("busy", "steal"))
        return {
            "cores_busy": round(busy / CLOCK_TICKS / seconds, 2),
            "cores_stolen_by_host": round(steal / CLOCK_TICKS / seconds, 2),
            "client_cores": round((time.process_time() - self.client) / seconds, 2),
        }


def _machine_ticks() -> dict[str, int]:
    """Clock ticks the machine spent busy (steal included) and stolen, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]
    )
    return {"busy": user + nice + system + irq + softirq + steal, "steal": steal}
