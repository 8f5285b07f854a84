"""Overhead on time to first token: ours and LiteLLM against the upstream called directly.

Six processes: the fake OpenAI-compatible upstream (`bench/harness/upstream.py`, `--ttft-ms`
before the first token), the service on SQLite and on PostgreSQL (`chatbot serve`, JWT on,
limits out of the way), the lean reference server on PostgreSQL (`bench/lean.py`: the essential
work of a turn only, the floor ours is held against), the LiteLLM proxy from its own venv (`make
bench-env`) relaying to the same upstream, and this one, the client. The client reads every
stream over its own lean HTTP/1.1 connection and stops the clock at the first content delta: an
OpenAI chunk with content for the upstream and LiteLLM, the first `delta` event for ours and the
lean server (POST .../messages, pre-created conversations).

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
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clients import TurnError, run_client_loop, sse_events
from harness.processes import MachineLoad, cpu_seconds, wait_quiet
from harness.report import fmt, measured_at, met_lines, percentiles
from harness.scenario import (
    add_streaming_options,
    comma_list,
    finish,
    parse_scenario_args,
    rotated,
    run_scenario,
    scenario_parser,
)
from harness.servers import DIRECT, LITELLM, OURS, Servers, lean_peer
from harness.targets import Slot, Target, make_slots, prepare_conversations
from harness.upstream import ReplyShape

SEQUENTIAL_MODEL = "bench-sequential"
SCENARIO = "ttft_overhead"


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


async def _turn(target: Target, slot: Slot, model: str) -> float:
    """One streamed request read to its end; the milliseconds to its first content."""
    connection = slot.connection(target.name, target.port)
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
                if any(target.first_token(name, data) for name, data in sse_events(buffer)):
                    ttft_ms = (arrived - started) * 1000
            window = previous[-32:] + chunk
            ended = ended or target.end_marker in window
            failed = failed or (target.speaks_ours and b"event: error" in window)
            previous = chunk
    except BaseException:
        connection.close()  # whatever state it was left in, start afresh
        raise
    if failed or not ended or ttft_ms is None:
        raise TurnError(f"{target.name}: stream ended badly: {previous[-300:]!r}")
    return ttft_ms


def _cpu(targets: list[Target]) -> dict[str, float]:
    """CPU seconds each server has used so far, and when ("at")."""
    return {"at": time.monotonic()} | {target.name: cpu_seconds([target.pid]) for target in targets}


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


def _ratios(level: dict[str, Any], peer: str | None = LITELLM) -> dict[str, dict[str, Any]]:
    """Ours over `peer` (LiteLLM; None: the lean server on the same database), added
    milliseconds, per database and percentile; on the sequential level also the server CPU per
    turn."""
    ratios: dict[str, dict[str, Any]] = {}
    targets = level["targets"]
    for name in OURS:
        other = peer or lean_peer(name)
        if name not in targets or other not in targets:
            continue
        ours, theirs = targets[name], targets[other]
        ratios[name] = {
            key: _ratio(ours["added_ms"][key], theirs["added_ms"][key])
            for key in ("p50", "p95", "p99")
        }
        if peer is None:
            ratios[name]["against"] = other
            if "server_cpu_ms_per_turn" in ours:
                cpu = _ratio(ours["server_cpu_ms_per_turn"], theirs["server_cpu_ms_per_turn"])
                ratios[name]["server_cpu_per_turn"] = cpu
    return ratios


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    """None unless both were measured and the divisor is positive (added TTFT can be below 0)."""
    return (
        round(ours / theirs, 3) if ours is not None and theirs is not None and theirs > 0 else None
    )


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
        "then shows the noise floor). `lean-*` is the lean reference server (`bench/lean.py`: "
        "the essential work of a turn, the floor); ours / lean compares the same database.",
        "",
        "| streams | configuration | TTFT p50 | added p50 | added p95 | added p99 "
        "| ours / LiteLLM (p50) | ours / lean (p50) | server CPU | samples | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in result["levels"].values():
        ratios, to_lean = level["ratio_ours_to_litellm"], level.get("ratio_ours_to_lean", {})
        for name, row in level["targets"].items():
            added = row["added_ms"] or {"p50": None, "p95": None, "p99": None}
            ratio = ratios.get(name, {}).get("p50")
            lean = to_lean.get(name, {}).get("p50")
            if level["streams"] == 1:
                cpu = fmt(row["server_cpu_ms_per_turn"], " ms/turn")
            else:
                share = row["server_cpu_pct_of_one_core"]
                cpu = "-" if share is None else f"{share}% of a core"
            lines.append(
                f"| {level['streams']} | {name} | {fmt(row['ttft_ms']['p50'])} "
                f"| {fmt(added['p50'])} | {fmt(added['p95'])} | {fmt(added['p99'])} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} "
                f"| {'-' if lean is None else f'{lean:.2f}'} | {cpu} | {row['samples']} "
                f"| {row['errors']} |"
            )
    sequential = result["levels"].get("sequential", {}).get("ratio_ours_to_lean", {})
    notes = [
        f"- {name} / {ratio['against']}: server CPU per turn {ratio['server_cpu_per_turn']:.2f}x "
        "(1 stream)"
        for name, ratio in sequential.items()
        if ratio.get("server_cpu_per_turn") is not None
    ]
    lines += ["", *notes, *met_lines(result["targets_met"])]
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
        levels = run_client_loop(_measure(args, targets, servers.jwt_secret, shapes))
        servers.check_alive()
        litellm_version = servers.litellm_version()
    for level in levels.values():
        level["ratio_ours_to_litellm"] = _ratios(level)
        level["ratio_ours_to_lean"] = _ratios(level, None)
    return {
        "measured_at": measured_at(),
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
    sequential = make_slots(1, secret, "sequential")
    # Several conversations, so that none grows past the history window during the run.
    await prepare_conversations(targets, sequential, SEQUENTIAL_MODEL, 8, SEQUENTIAL_MODEL)
    clients = {level: make_slots(level, secret, f"c{level}") for level in args.levels}
    for level, slots in clients.items():
        await prepare_conversations(targets, slots, shapes[str(level)].model, 1, SEQUENTIAL_MODEL)
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


def main() -> None:
    parser = scenario_parser(
        __doc__, "chatbot_bench_overhead", [DIRECT, *OURS, "lean-postgres-aiohttp", LITELLM]
    )
    parser.add_argument("--levels", type=comma_list(int), default=[50, 200])
    add_streaming_options(parser)
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
    args = parse_scenario_args(parser)

    result, workdir = run_scenario(SCENARIO, "overhead", args, run, _markdown)
    errors = sum(
        row["errors"] for level in result["levels"].values() for row in level["targets"].values()
    )
    finish(workdir, args.keep, f"{errors} requests failed" if errors else None)


if __name__ == "__main__":
    main()
