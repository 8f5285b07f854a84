"""Overhead on time to first token: ours and LiteLLM against the upstream called directly.

Five processes: the fake OpenAI-compatible upstream (`bench/upstream.py`, `--ttft-ms` before the
first token), the service on SQLite and on PostgreSQL (`chatbot serve`, JWT on, limits out of
the way), the LiteLLM proxy from its own venv (`make bench-env`) relaying to the same upstream,
and this one, the client. The client reads every stream over its own lean HTTP/1.1 connection
and stops the clock at the first content delta: an OpenAI chunk with content for the upstream
and LiteLLM, the first `delta` event for ours (POST .../messages, pre-created conversations).

- Sequential: one stream at a time, short replies; each round sends one request to every
  configuration, in an order that rotates from round to round. Added = TTFT of the
  configuration minus TTFT of the direct call of the same round.
- N concurrent streams: N clients each send request after request to one configuration, so
  that N streams are always in flight, then all move on to the next configuration; rounds repeat
  with the order rotated. Replies last N / `--arrivals-per-second` seconds, so new streams
  arrive at the same rate at every level (the load of a busy service, not a saturated one) and
  only the number of streams in flight grows. A request counts once all N clients have moved to
  its configuration, for `--window-seconds`. Added = its TTFT minus the median direct TTFT of
  the same round.

    python bench/overhead.py                          # the full scenario, about 5 minutes
    python bench/overhead.py --levels 50 --rounds 1 --sequential-rounds 20   # a quick look

Writes its part of bench/results/latest.json (key "ttft_overhead") and of latest.md.
Exits non-zero when a request fails.
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from loadtest import CLOCK_TICKS, RawStream, _cpu_seconds, _events, _user_token
from report import fmt, percentiles
from servers import (
    DIRECT,
    LITELLM,
    OURS,
    PEERS_VENV,
    ReplyShape,
    Server,
    Servers,
    comma_list,
    is_ours,
    parse_scenario_args,
    rotated,
    run_scenario,
    scenario_parser,
    wait_quiet,
)

SEQUENTIAL_MODEL = "bench-sequential"
SCENARIO = "ttft_overhead"
T = TypeVar("T")


class TurnError(Exception):
    pass


def _shapes(args: argparse.Namespace) -> dict[str, ReplyShape]:
    """The sequential shape, and one per concurrency level: long enough that N streams stay in
    flight while new ones arrive at `--arrivals-per-second`."""
    tokens, per_second = args.sequential_reply.split(":")
    shapes = {"sequential": ReplyShape(SEQUENTIAL_MODEL, int(tokens), float(per_second))}
    for level in args.levels:
        seconds = level / args.arrivals_per_second - args.ttft_ms / 1000
        shapes[str(level)] = ReplyShape(
            f"bench-{level}-streams",
            max(2, round(seconds * args.tokens_per_second) + 1),
            args.tokens_per_second,
        )
    return shapes


class Connection(RawStream):
    async def open(self) -> None:
        """Connect before the clock starts: the first time, or again after the server closed
        the connection for being idle (uvicorn does after 5 s, between phases)."""
        if self._reader is not None and self._reader.at_eof():
            self.close()
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)


@dataclass
class Target:
    name: str
    port: int
    pid: int
    """The process that serves it (the upstream itself for `direct`)."""
    ours: bool
    master_key: str | None = None

    @classmethod
    def of(cls, server: Server, master_key: str) -> "Target":
        """How to reach a started server: ours as a user, LiteLLM with its master key."""
        return cls(
            server.name,
            server.port,
            server.pid,
            ours=is_ours(server.name),
            master_key=master_key if server.name == LITELLM else None,
        )

    def request(self, slot: "Slot", model: str) -> tuple[str, bytes, dict[str, str]]:
        turn = slot.turns[self.name] = slot.turns.get(self.name, 0) + 1
        content = f"client {slot.index} turn {turn}: how far is the moon?"
        if self.ours:
            # In turn through the client's conversations, so that each stays short.
            conversations = slot.conversations[self.name]
            conversation_id = conversations[turn % len(conversations)]
            return (
                f"/v1/conversations/{conversation_id}/messages",
                json.dumps({"content": content}).encode(),
                {"Authorization": f"Bearer {slot.token}", "Accept": "text/event-stream"},
            )
        headers = {"Accept": "text/event-stream"}
        if self.master_key:
            headers["Authorization"] = f"Bearer {self.master_key}"
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}],
        }
        return "/v1/chat/completions", json.dumps(body).encode(), headers

    def first_token(self, name: str, data: str) -> bool:
        if self.ours:
            return name == "delta"
        if data == "[DONE]":
            return False
        choices = json.loads(data).get("choices") or [{}]
        return bool(choices[0].get("delta", {}).get("content"))

    @property
    def end_marker(self) -> bytes:
        return b"event: done" if self.ours else b"data: [DONE]"


@dataclass
class Slot:
    """One client: its user, its conversations on each database, its connections."""

    index: int
    token: str
    conversations: dict[str, list[str]] = field(default_factory=dict)
    connections: dict[str, Connection] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    """Requests sent so far, by configuration."""

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


async def _turn(target: Target, slot: Slot, model: str) -> float:
    """One streamed request read to its end; the milliseconds to its first content."""
    connection = slot.connections.setdefault(target.name, Connection("127.0.0.1", target.port))
    path, body, headers = target.request(slot, model)
    try:
        await connection.open()
        started = time.perf_counter()
        status = await connection.post(path, body, headers)
        if status != 200:
            text = b"".join([chunk async for chunk in connection.body()])
            raise TurnError(f"{target.name}: HTTP {status}: {text[:300]!r}")
        ttft_ms: float | None = None
        buffer = bytearray()
        previous = b""
        ended = failed = False
        async for chunk in connection.body():
            if ttft_ms is None:
                arrived = time.perf_counter()
                buffer += chunk
                if any(target.first_token(name, data) for name, data in _events(buffer)):
                    ttft_ms = (arrived - started) * 1000
            window = previous[-32:] + chunk
            ended = ended or target.end_marker in window
            failed = failed or (target.ours and b"event: error" in window)
            previous = chunk
    except BaseException:
        connection.close()  # whatever state it was left in, start afresh
        raise
    if failed or not ended or ttft_ms is None:
        raise TurnError(f"{target.name}: stream ended badly: {previous[-300:]!r}")
    return ttft_ms


def _cpu(targets: list[Target]) -> dict[str, float]:
    """CPU seconds each server has used so far, and when ("at")."""
    return {"at": time.monotonic()} | {target.name: _cpu_seconds(target.pid) for target in targets}


class MachineLoad:
    """How busy the whole machine and this client were over a stretch: the noise around it."""

    def __init__(self) -> None:
        self.started, self.stat, self.client = time.monotonic(), _stat(), time.process_time()

    def report(self) -> dict[str, float]:
        seconds = time.monotonic() - self.started
        stat = _stat()
        busy, steal = (stat[key] - self.stat[key] for key in ("busy", "steal"))
        return {
            "cores_busy": round(busy / CLOCK_TICKS / seconds, 2),
            "cores_stolen_by_host": round(steal / CLOCK_TICKS / seconds, 2),
            "client_cores": round((time.process_time() - self.client) / seconds, 2),
        }


def _stat() -> dict[str, int]:
    """Clock ticks the machine spent busy (steal included) and stolen, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]
    )
    return {"busy": user + nice + system + irq + softirq + steal, "steal": steal}


# ---------------------------------------------------------------- levels


async def _sequential(
    targets: list[Target], slot: Slot, rounds: int, warmup: int
) -> dict[str, Any]:
    ttfts: dict[str, list[float]] = {target.name: [] for target in targets}
    errors: dict[str, list[str]] = {target.name: [] for target in targets}
    cpu_before, started, load = _cpu(targets), time.monotonic(), MachineLoad()
    for round_number in range(warmup + rounds):
        for target in rotated(targets, round_number):
            try:
                ttft_ms = await asyncio.wait_for(_turn(target, slot, SEQUENTIAL_MODEL), 30)
            except Exception as exc:
                errors[target.name].append(repr(exc))
                ttft_ms = None
            if round_number >= warmup:
                ttfts[target.name].append(ttft_ms if ttft_ms is not None else float("nan"))
            await asyncio.sleep(0.01)  # let the turn's last writes land before the next one
    cpu_after, wall_s = _cpu(targets), time.monotonic() - started
    report: dict[str, Any] = {
        "streams": 1,
        "rounds": rounds,
        "wall_s": round(wall_s, 1),
        "machine": load.report(),
    }
    report["targets"] = {}
    for target in targets:
        mine = ttfts[target.name]
        added = [ttft - base for ttft, base in zip(mine, ttfts[DIRECT], strict=True)]
        # The upstream serves every configuration's requests; the others only their own.
        served = (warmup + rounds) * (len(targets) if target.name == DIRECT else 1)
        cpu_s = cpu_after[target.name] - cpu_before[target.name]
        report["targets"][target.name] = {
            "samples": sum(1 for value in mine if value == value),
            "errors": len(errors[target.name]),
            "error_samples": errors[target.name][:3],
            "ttft_ms": percentiles(mine),
            "added_ms": None if target.name == DIRECT else percentiles(added),
            "server_cpu_ms_per_turn": round(1000 * cpu_s / served, 2),
        }
    return report


@dataclass
class Phase:
    target: Target
    round_number: int
    switched: int = 0
    all_switched: asyncio.Event = field(default_factory=asyncio.Event)
    counted_from: float | None = None
    """When the last client moved to this phase: its requests count from then on..."""
    counted_to: float | None = None
    """...until `--window-seconds` later, when the next phase begins."""
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    """(sent at, TTFT in ms, streams in flight when it was sent)."""
    errors: list[str] = field(default_factory=list)
    cpu_from: dict[str, float] = field(default_factory=dict)
    cpu_to: dict[str, float] = field(default_factory=dict)


async def _concurrent(
    targets: list[Target], slots: list[Slot], shape: ReplyShape, args: argparse.Namespace
) -> dict[str, Any]:
    reply_s = shape.seconds(args.ttft_ms)
    phases = [
        Phase(target, round_number)
        for round_number in range(args.rounds)
        for target in rotated(targets, round_number)
    ]
    current = 0
    in_flight = 0

    async def client(slot: Slot) -> None:
        nonlocal in_flight
        # Started one after the other over a reply's time: arrivals are spread from the start.
        await asyncio.sleep(slot.index * reply_s / len(slots))
        mine = -1
        while (index := current) < len(phases):
            phase = phases[index]
            if index != mine:
                mine = index
                phase.switched += 1
                if phase.switched == len(slots):
                    phase.counted_from = time.monotonic()
                    phase.cpu_from = _cpu(targets)
                    phase.all_switched.set()
            in_flight += 1
            streams_at_send, sent_at = in_flight, time.monotonic()
            try:
                ttft_ms = await asyncio.wait_for(_turn(phase.target, slot, shape.model), 60)
                phase.samples.append((sent_at, ttft_ms, streams_at_send))
            except Exception as exc:
                phase.errors.append(repr(exc))
                await asyncio.sleep(0.5)  # an error should not turn into a tight loop
            finally:
                in_flight -= 1

    async def conduct() -> None:
        """Each phase: wait until every client has moved to it, count for the window, move on."""
        nonlocal current
        for index, phase in enumerate(phases):
            # A client moves on when its stream ends: a reply's time, longer when overloaded.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(phase.all_switched.wait(), 3 * reply_s + 30)
            if phase.all_switched.is_set():
                await asyncio.sleep(args.window_seconds)
                phase.counted_to, phase.cpu_to = time.monotonic(), _cpu(targets)
            current = index + 1

    started, load = time.monotonic(), MachineLoad()
    await asyncio.gather(conduct(), *(client(slot) for slot in slots))
    wall_s = time.monotonic() - started

    baseline: dict[int, float] = {}
    for phase in phases:
        if phase.target.name == DIRECT and (counted := _counted(phase)):
            baseline[phase.round_number] = statistics.median(counted)
    report: dict[str, Any] = {
        "streams": len(slots),
        "rounds": args.rounds,
        "window_s": args.window_seconds,
        "reply": shape.describe(),
        "reply_s": round(reply_s, 2),
        "wall_s": round(wall_s, 1),
        "machine": load.report(),
        "targets": {},
    }
    for target in targets:
        mine = [phase for phase in phases if phase.target is target]
        ttfts = [ttft for phase in mine for ttft in _counted(phase)]
        added = [
            ttft - baseline[phase.round_number]
            for phase in mine
            if phase.round_number in baseline
            for ttft in _counted(phase)
        ]
        errors = [error for phase in mine for error in phase.errors]
        in_flight_seen = [count for phase in mine for _, _, count in _counted_samples(phase)]
        windows = [phase for phase in mine if phase.cpu_from and phase.cpu_to]
        report["targets"][target.name] = {
            "samples": len(ttfts),
            "phases_without_samples": sum(1 for phase in mine if not _counted(phase)),
            "errors": len(errors),
            "error_samples": errors[:3],
            "ttft_ms": percentiles(ttfts),
            "added_ms": percentiles(added),
            "in_flight_at_send": {
                "min": min(in_flight_seen, default=0),
                "mean": round(statistics.fmean(in_flight_seen), 1) if in_flight_seen else 0,
            },
            "server_cpu_pct_of_one_core": _cpu_share(windows, [target.name]),
            # Work another server left over (e.g. a backlog) would disturb this one's window.
            "other_servers_cpu_pct_of_one_core": _cpu_share(
                windows,
                [other.name for other in targets if other.name not in (target.name, DIRECT)],
            ),
        }
    return report


def _cpu_share(windows: list[Phase], names: list[str]) -> int | None:
    """Mean share of one core the named processes used during the counted windows."""
    shares = [
        sum(phase.cpu_to[name] - phase.cpu_from[name] for name in names)
        / (phase.cpu_to["at"] - phase.cpu_from["at"])
        for phase in windows
    ]
    return round(100 * statistics.fmean(shares)) if shares else None


def _counted_samples(phase: Phase) -> list[tuple[float, float, int]]:
    if phase.counted_from is None or phase.counted_to is None:
        return []
    return [
        sample for sample in phase.samples if phase.counted_from <= sample[0] < phase.counted_to
    ]


def _counted(phase: Phase) -> list[float]:
    return [ttft for _, ttft, _ in _counted_samples(phase)]


def _ratios(level: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Ours over LiteLLM, added milliseconds, per database and percentile."""
    ratios: dict[str, dict[str, float | None]] = {}
    targets = level["targets"]
    if LITELLM not in targets:
        return ratios
    theirs = targets[LITELLM]["added_ms"]
    for name in OURS:
        if name in targets:
            ours = targets[name]["added_ms"]
            ratios[name] = {
                key: round(ours[key] / theirs[key], 3)
                if ours[key] is not None and theirs[key] is not None and theirs[key] > 0
                else None
                for key in ("p50", "p95", "p99")
            }
    return ratios


# ---------------------------------------------------------------- ours: users, conversations


def _slots(count: int, secret: str, prefix: str) -> list[Slot]:
    return [Slot(index, _user_token(secret, f"bench-{prefix}-{index}")) for index in range(count)]


async def _prepare_ours(
    targets: list[Target], slots: list[Slot], model: str, per_slot: int
) -> None:
    """Conversations for every client on every database, each already titled by one turn
    (the title is a chore of the first exchange only), so that measured turns are typical."""
    for target in targets:
        if target.ours:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{target.port}",
                timeout=60,
                limits=httpx.Limits(max_connections=25),
            ) as client:
                await asyncio.gather(
                    *(_conversations(client, target, slot, model, per_slot) for slot in slots)
                )


async def _conversations(
    client: httpx.AsyncClient, target: Target, slot: Slot, model: str, count: int
) -> None:
    headers = {"Authorization": f"Bearer {slot.token}"}
    ids = slot.conversations.setdefault(target.name, [])
    for _ in range(count):
        response = await client.post("/v1/conversations", json={"model": model}, headers=headers)
        response.raise_for_status()
        ids.append(response.json()["id"])
        response = await client.post(
            f"/v1/conversations/{ids[-1]}/messages",
            json={"content": "hello", "model": SEQUENTIAL_MODEL},
            headers=headers,
        )
        response.raise_for_status()


# ---------------------------------------------------------------- report


def _markdown(result: dict[str, Any]) -> str:
    upstream = result["upstream"]
    replies = "; ".join(
        f"{'1 stream' if name == 'sequential' else f'{name} streams'}: {shape['tokens']} "
        f"tokens at {shape['per_second']:g}/s"
        for name, shape in upstream["replies"].items()
    )
    lines = [
        "### Overhead on time to first token",
        "",
        f"Fake upstream: {upstream['ttft_ms']:g} ms to the first token, then {replies}; at "
        f"each concurrency level new streams arrive at about {upstream['arrivals_per_second']:g}"
        f"/s. LiteLLM {result['litellm_version']}. Added = TTFT minus the direct call's in the "
        "same round (sequential) or its median in the same round (concurrent; the direct row "
        "then shows the noise floor).",
        "",
        "| streams | configuration | TTFT p50 | added p50 | added p95 | added p99 "
        "| ours / LiteLLM (p50) | server CPU | samples | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"].values():
        ratios = level["ratio_ours_to_litellm"]
        for name, row in level["targets"].items():
            added = row["added_ms"] or {"p50": None, "p95": None, "p99": None}
            ratio = ratios.get(name, {}).get("p50")
            if level["streams"] == 1:
                cpu = fmt(row["server_cpu_ms_per_turn"], " ms/turn")
            else:
                share = row["server_cpu_pct_of_one_core"]
                cpu = "-" if share is None else f"{share}% of a core"
            lines.append(
                f"| {level['streams']} | {name} | {fmt(row['ttft_ms']['p50'])} "
                f"| {fmt(added['p50'])} | {fmt(added['p95'])} | {fmt(added['p99'])} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} | {cpu} | {row['samples']} "
                f"| {row['errors']} |"
            )
    lines.append("")
    for name, met in result["targets_met"].items():
        lines.append(f"- {name}: {'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n"


def _targets_met(levels: dict[str, dict[str, Any]]) -> dict[str, bool]:
    met: dict[str, bool] = {}

    def p50(level: str, name: str) -> float | None:
        row = levels.get(level, {}).get("targets", {}).get(name)
        return row["added_ms"]["p50"] if row and row["added_ms"] else None

    for name in OURS:
        for level, limit in (("sequential", 3.0), ("200", 15.0)):
            value = p50(level, name)
            if value is not None:
                met[f"{name}: added p50 <= {limit:g} ms at {level}"] = value <= limit
        pairs = [(p50(level, name), p50(level, LITELLM)) for level in levels]
        compared = [
            (ours, theirs) for ours, theirs in pairs if ours is not None and theirs is not None
        ]
        if compared:
            met[f"{name}: added p50 below LiteLLM's at every level"] = all(
                ours < theirs for ours, theirs in compared
            )
    return met


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shapes = _shapes(args)
    with Servers(
        workdir,
        args.targets,
        list(shapes.values()),
        args.ttft_ms,
        args.database_url,
        args.pg_database,
        args.peers_venv,
    ) as servers:
        targets = [Target.of(server, servers.master_key) for server in servers.servers.values()]
        print(f"measuring {', '.join(t.name for t in targets)}; logs in {workdir}", flush=True)
        levels = _run_loop(_measure(args, targets, servers.jwt_secret, shapes))
        servers.check_alive()
        litellm_version = servers.litellm_version()
    for level in levels.values():
        level["ratio_ours_to_litellm"] = _ratios(level)
    return {
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "litellm_version": litellm_version,
        "upstream": {
            "ttft_ms": args.ttft_ms,
            "arrivals_per_second": args.arrivals_per_second,
            "replies": {name: shape.describe() for name, shape in shapes.items()},
        },
        "levels": levels,
        "targets_met": _targets_met(levels),
    }


async def _measure(
    args: argparse.Namespace, targets: list[Target], secret: str, shapes: dict[str, ReplyShape]
) -> dict[str, dict[str, Any]]:
    levels: dict[str, dict[str, Any]] = {}
    sequential = _slots(1, secret, "sequential")
    # Several conversations, so that none grows past the history window during the run.
    await _prepare_ours(targets, sequential, SEQUENTIAL_MODEL, per_slot=8)
    clients = {level: _slots(level, secret, f"c{level}") for level in args.levels}
    for level, slots in clients.items():
        await _prepare_ours(targets, slots, shapes[str(level)].model, per_slot=1)
    # The titles of the new conversations are written after their replies.
    await wait_quiet([target.pid for target in targets])
    try:
        print(f"sequential: {args.sequential_rounds} rounds", flush=True)
        levels["sequential"] = await _sequential(
            targets, sequential[0], args.sequential_rounds, args.warmup_rounds
        )
        _progress(levels["sequential"])
        for level, slots in clients.items():
            shape = shapes[str(level)]
            print(
                f"{level} streams: {args.rounds} rounds, replies of {shape.tokens} tokens",
                flush=True,
            )
            await wait_quiet([target.pid for target in targets])
            levels[str(level)] = await _concurrent(targets, slots, shape, args)
            _progress(levels[str(level)])
            for slot in slots:
                slot.close()
    finally:
        sequential[0].close()
    return levels


def _progress(level: dict[str, Any]) -> None:
    machine = level["machine"]
    print(
        f"  ({level['wall_s']:g} s; {machine['cores_busy']:g} of {os.cpu_count()} cores busy, "
        f"{machine['client_cores']:g} of them this client, {machine['cores_stolen_by_host']:g}"
        " stolen by the host)",
        flush=True,
    )
    for name, row in level["targets"].items():
        added = row["added_ms"] or {}
        print(
            f"  {name:14} ttft p50 {fmt(row['ttft_ms']['p50'])}, added p50/p95/p99 "
            f"{fmt(added.get('p50'))} / {fmt(added.get('p95'))} / {fmt(added.get('p99'))}"
            f" ({row['samples']} samples, {row['errors']} errors)",
            flush=True,
        )


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        from uvloop import run  # a lean client: the service's own event loop
    except ImportError:
        from asyncio import run
    return run(main)


def main() -> None:
    parser = scenario_parser(__doc__, "chatbot_bench_overhead", [DIRECT, *OURS, LITELLM])
    parser.add_argument("--levels", type=comma_list(int), default=[50, 200])
    parser.add_argument("--ttft-ms", type=float, default=50, help="the upstream's wait")
    parser.add_argument(
        "--sequential-reply", default="10:200", help="TOKENS:PER_SECOND of sequential replies"
    )
    parser.add_argument(
        "--tokens-per-second", type=float, default=10, help="pace of the concurrent replies"
    )
    parser.add_argument(
        "--arrivals-per-second",
        type=float,
        default=20,
        help="new streams a second at every concurrency level (sets the replies' length)",
    )
    parser.add_argument("--sequential-rounds", type=int, default=100)
    parser.add_argument("--warmup-rounds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="rounds at each concurrent level")
    parser.add_argument(
        "--window-seconds", type=float, default=4, help="counted time of each phase"
    )
    parser.add_argument("--peers-venv", type=Path, default=PEERS_VENV)
    args = parse_scenario_args(parser)

    result, workdir = run_scenario(SCENARIO, "overhead", args, run, _markdown)
    errors = sum(
        row["errors"] for level in result["levels"].values() for row in level["targets"].values()
    )
    if errors:
        print(f"FAILED: {errors} requests failed; logs kept in {workdir}", file=sys.stderr)
        sys.exit(1)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
