"""Capacity: how many concurrent streams one worker holds, and the memory each open stream costs.

Five processes share the machine's two cores: the fake OpenAI-compatible upstream
(`bench/harness/upstream.py`, `--ttft-ms` before the first token, then `--tokens` tokens at
`--tokens-per-second`), the service on SQLite and on PostgreSQL (`chatbot serve`, one worker,
JWT on, limits out of the way), the lean reference server on PostgreSQL (`bench/lean.py`: the
essential work of a turn only, the floor ours is held against; and its `--decoupled` variant,
each reply produced by a task of its own as one that outlives its client must be, which tells
what that design costs per token), the LiteLLM proxy from its own
venv (`make bench-env`) relaying to the same upstream, and this one, the client. `direct` (the
upstream called directly) is always measured: it is the ceiling of the harness itself (upstream
and client), not of a service.

Levels go up. At each level every configuration still in the race runs once, alone, in an order
that rotates from level to level: N clients each keep one stream open at all times (send, read
the reply to its end over a lean HTTP/1.1 connection, send the next), starting one after the
other over `--ramp-seconds`, then counted for `--window-seconds`; no new stream starts after the
window and the servers are left to go quiet before the next phase. Counted, per stream: the
gap between consecutive content tokens as they reach the client (the wait before the first
token is not a gap; tokens that arrive in one read after the first have gap 0), and every
failure (a status other than 200, an error event, a stream that ends without its last event or
short of tokens, a connection error or a timeout). A configuration passes a level when nothing
failed, the p95 gap is at most `--max-p95-gap-ms` and it delivered most of the tokens a second
that N streams on time would get (streams waiting for their first token are not held); its
capacity is the highest level passed, and it is not run above a level it failed.

Memory: the resident set of the server's processes (VmRSS), idle after a warm-up, and sampled
every second of each window (the median is reported); per open stream = (RSS at the level - idle
RSS) / N. CPU: the share of one core used by the server, by the fake upstream and by this client
over each window; the three compete for the same two cores, which is what bounds the result.

The wait before the first token is not a gap, so a server that queues streams (ours relays at
most CHATBOT_UPSTREAM_MAX_CONNECTIONS replies at once, 1000 by default; the variable passes
through from this environment) could pass on gaps alone: that is why the delivered share counts,
and why the report gives each level's time to first token; `--max-p95-ttft-ms` makes the TTFT
part of passing too.

    python bench/capacity.py                       # the full scenario, 10 to 15 minutes
    python bench/capacity.py --levels 20,50 --window-seconds 5 --ramp-seconds 2 \\
        --targets ours-sqlite --output /tmp/cap.json --markdown /tmp/cap.md   # a quick look

Writes its part of bench/results/latest.json (key "capacity") and of latest.md. A configuration
failing a level is the measurement, not an error: exits non-zero only when the run itself breaks.
"""

import argparse
import array
import asyncio
import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clients import run_client_loop
from harness.processes import (
    MachineLoad,
    cpu_seconds,
    is_alive,
    raise_open_files_limit,
    rss_kib,
    wait_quiet,
)
from harness.report import fmt, measured_at, percentiles
from harness.scenario import (
    add_streaming_options,
    comma_list,
    finish,
    parse_scenario_args,
    rotated,
    run_scenario,
    scenario_parser,
)
from harness.servers import DIRECT, LITELLM, OURS, Servers, is_ours, lean_peer
from harness.targets import Slot, Target, make_slots, prepare_conversations
from harness.upstream import ReplyShape

from chatbot.config import Settings

SCENARIO = "capacity"
MODEL = "bench-capacity"
FIRST_TURN_SHAPE = ReplyShape("bench-sequential", 10, 200)
"""The short reply of the turn that titles each conversation before it is used (overhead's
sequential reply)."""
TURNS_PER_CONVERSATION = 16
"""Measured turns a conversation takes: its history stays inside the window (no summaries)."""
WARMUP_STREAMS = 10
TARGET_STREAMS = 800
TARGET_KIB_PER_STREAM = 64
QUEUED_SHARE = 0.9
"""Below this share of the offered tokens/s, streams were queued rather than served."""


class StreamError(Exception):
    """A stream that failed; its first argument is the kind."""


# ---------------------------------------------------------------- what a stream carries


def _content_tokens_ours(chunk: bytes) -> int:
    return chunk.count(b"event: delta")


def _content_tokens_openai(chunk: bytes) -> int:
    """OpenAI chunks with content, the role chunk's empty content left out. The fake upstream
    writes `"content": "..."` (json.dumps), LiteLLM `"content":"..."`."""
    return (
        chunk.count(b'"content": "')
        + chunk.count(b'"content":"')
        - chunk.count(b'"content": ""')
        - chunk.count(b'"content":""')
    )


# ---------------------------------------------------------------- processes


async def _quiet(configurations: list[Target], timeout_s: float = 60) -> bool:
    """Wait until every server (all its processes, unlike overhead, which waits for each
    server's main process) is idle: what a phase left to do (the replies' last writes, titles)
    must not land in the next one."""
    pids = [pid for configuration in configurations for pid in configuration.pids()]
    return await wait_quiet(pids, timeout_s)


async def _idle_rss_kib(configuration: Target) -> int:
    samples = []
    for _ in range(5):
        samples.append(rss_kib(configuration.pids()))
        await asyncio.sleep(0.2)
    return round(statistics.median(samples))


# ---------------------------------------------------------------- one phase


@dataclass
class Phase:
    """One configuration at one level: N clients, a ramp, a counted window."""

    configuration: Target
    streams: int
    counted_from: float
    counted_to: float
    expected_tokens: int
    gaps: "array.array[float]" = field(default_factory=lambda: array.array("d"))
    """Seconds between consecutive content tokens of a stream, arrived in the window."""
    tokens: int = 0
    """Content tokens that arrived in the window."""
    ttfts: list[float] = field(default_factory=list)
    """Seconds from request to first content token, of first tokens that arrived in the window."""
    completed: int = 0
    """Streams that ended well (any time in the phase)."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(kind, detail), any time in the phase."""
    open_streams: int = 0
    rss_kib: list[int] = field(default_factory=list)
    open_samples: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)


async def _stream(phase: Phase, slot: Slot) -> None:
    """One streamed reply read to its end, its token gaps recorded; StreamError if it fails."""
    target = phase.configuration
    connection = slot.connection(target.name, target.port)
    count = _content_tokens_ours if target.speaks_ours else _content_tokens_openai
    end_marker, error_marker = target.end_marker, target.error_marker
    path, body, headers = target.request(slot, MODEL)
    gaps, counted_from, counted_to = phase.gaps, phase.counted_from, phase.counted_to
    clock = time.monotonic
    try:
        await connection.open()
        sent = clock()
        status = await connection.post(path, body, headers)
        if status != 200:
            text = b"".join([chunk async for chunk in connection.body()])
            raise StreamError("http_status", f"HTTP {status}: {text[:200]!r}")
        phase.open_streams += 1
        try:
            previous: float | None = None
            received = 0
            tail = b""
            ended = failed = False
            async for chunk in connection.body():
                if tokens := count(chunk):
                    now = clock()
                    received += tokens
                    if counted_from <= now < counted_to:
                        phase.tokens += tokens
                        if previous is not None:
                            gaps.append(now - previous)
                        else:
                            phase.ttfts.append(now - sent)
                        if tokens > 1:
                            gaps.extend(itertools.repeat(0.0, tokens - 1))
                    previous = now
                window = tail + chunk
                ended = ended or end_marker in window
                failed = failed or error_marker in window
                tail = chunk[-32:]
        finally:
            phase.open_streams -= 1
    except BaseException:
        connection.close()  # whatever state it was left in, start afresh
        raise
    if failed:
        raise StreamError("error_event", tail.decode(errors="replace"))
    if not ended:
        raise StreamError("no_end", f"after {received} tokens: {tail!r}")
    if received != phase.expected_tokens:
        raise StreamError("short", f"{received} of {phase.expected_tokens} tokens")


async def _client(phase: Phase, slot: Slot, delay: float, turn_timeout: float) -> None:
    await asyncio.sleep(delay)
    while time.monotonic() < phase.counted_to:
        try:
            async with asyncio.timeout(turn_timeout):
                await _stream(phase, slot)
            phase.completed += 1
        except StreamError as exc:
            phase.failures.append((str(exc.args[0]), str(exc.args[1])))
            await asyncio.sleep(0.5)  # a failure should not turn into a tight loop
        except TimeoutError:
            phase.failures.append(("timeout", f"no end after {turn_timeout:g} s"))
        except Exception as exc:
            # Connection refused or reset, an incomplete read, a malformed response.
            phase.failures.append(("connection", repr(exc)[:200]))
            await asyncio.sleep(0.5)


async def _sample(phase: Phase, upstream: Target) -> None:
    """CPU counters at both ends of the window; RSS and open streams every second within it."""
    server_pids, upstream_pids = phase.configuration.pids(), upstream.pids()
    await asyncio.sleep(max(0.0, phase.counted_from - time.monotonic()))
    started, load = time.monotonic(), MachineLoad()
    server, fake, client = cpu_seconds(server_pids), cpu_seconds(upstream_pids), time.process_time()
    tick = started
    while (tick := tick + 1) <= phase.counted_to:
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        phase.rss_kib.append(rss_kib(server_pids))
        phase.open_samples.append(phase.open_streams)
    await asyncio.sleep(max(0.0, phase.counted_to - time.monotonic()))
    seconds = time.monotonic() - started
    phase.cpu = {
        "server": (cpu_seconds(server_pids) - server) / seconds,
        "upstream": (cpu_seconds(upstream_pids) - fake) / seconds,
        "client": (time.process_time() - client) / seconds,
    }
    phase.machine = load.report()


async def _phase(
    configuration: Target,
    upstream: Target,
    slots: list[Slot],
    shape: ReplyShape,
    args: argparse.Namespace,
) -> Phase:
    turn_timeout = 3 * shape.seconds(args.ttft_ms) + 30
    started = time.monotonic()
    phase = Phase(
        configuration,
        len(slots),
        counted_from=started + args.ramp_seconds,
        counted_to=started + args.ramp_seconds + args.window_seconds,
        expected_tokens=shape.tokens,
    )
    step = args.ramp_seconds / len(slots)
    try:
        await asyncio.gather(
            _sample(phase, upstream),
            *(_client(phase, slot, index * step, turn_timeout) for index, slot in enumerate(slots)),
        )
    finally:
        for slot in slots:
            slot.drop_connection(configuration.name)
    return phase


# ---------------------------------------------------------------- levels


def _conversations_needed(index: int, levels: list[int], turns_per_level: int) -> int:
    """Enough conversations for client `index` over every level it takes part in."""
    taking_part = sum(1 for level in levels if level > index)
    return max(1, math.ceil(taking_part * turns_per_level / TURNS_PER_CONVERSATION))


async def _prepare(
    configuration: Target,
    slots: list[Slot],
    levels: list[int],
    turns_per_level: int,
) -> None:
    """Titled conversations for the clients that have none on this configuration yet."""
    new = [slot for slot in slots if configuration.name not in slot.conversations]
    for count, group in itertools.groupby(
        new, key=lambda slot: _conversations_needed(slot.index, levels, turns_per_level)
    ):
        await prepare_conversations(
            [configuration], list(group), MODEL, count, FIRST_TURN_SHAPE.model
        )


async def _warm_up(configuration: Target, slots: list[Slot], shape: ReplyShape) -> int:
    """A few streams, so that the idle resident set is the one of a server that has served;
    the number that failed."""
    phase = Phase(configuration, len(slots), 0.0, 0.0, shape.tokens)
    timeout = 3 * shape.seconds(0) + 30
    failed = 0
    try:
        for _ in range(2):
            async with asyncio.timeout(timeout):
                outcomes = await asyncio.gather(
                    *(_stream(phase, slot) for slot in slots), return_exceptions=True
                )
            failed += sum(1 for outcome in outcomes if isinstance(outcome, Exception))
    finally:
        for slot in slots:
            slot.drop_connection(configuration.name)
    return failed


def _summarize(
    phase: Phase, idle_kib: int, shape: ReplyShape, args: argparse.Namespace
) -> dict[str, Any]:
    window = phase.counted_to - phase.counted_from
    gaps_ms = percentiles([gap * 1000 for gap in phase.gaps])
    ttft_ms = percentiles([ttft * 1000 for ttft in phase.ttfts])
    # What N streams deliver when every reply comes on time and the next follows at once.
    offered = phase.streams * shape.tokens / shape.seconds(args.ttft_ms)
    rss_kib = round(statistics.median(phase.rss_kib)) if phase.rss_kib else None
    kinds: dict[str, int] = {}
    for kind, _ in phase.failures:
        kinds[kind] = kinds.get(kind, 0) + 1
    p95 = gaps_ms["p95"]
    queued = phase.tokens / window / offered < QUEUED_SHARE
    # Streams that wait for their first token are not held: a level that delivers much less
    # than it offered is not passed, whatever its gaps.
    passed = not phase.failures and not queued and p95 is not None and p95 <= args.max_p95_gap_ms
    if args.max_p95_ttft_ms is not None:
        passed = passed and ttft_ms["p95"] is not None and ttft_ms["p95"] <= args.max_p95_ttft_ms
    return {
        "streams": phase.streams,
        "passed": passed,
        "gap_ms": gaps_ms,
        "gaps_counted": len(phase.gaps),
        "ttft_ms": ttft_ms,
        "failures": len(phase.failures),
        "failure_kinds": kinds,
        "failure_samples": [f"{kind}: {detail}" for kind, detail in phase.failures[:3]],
        "streams_completed": phase.completed,
        "open_streams_in_window": {
            "min": min(phase.open_samples, default=0),
            "median": statistics.median(phase.open_samples) if phase.open_samples else 0,
        },
        "tokens_per_s": round(phase.tokens / window, 1),
        "tokens_per_s_offered": round(offered, 1),
        "delivered_share": round(phase.tokens / window / offered, 3),
        "queued": queued,
        "rss_mib": None if rss_kib is None else round(rss_kib / 1024, 1),
        "kib_per_stream": None
        if rss_kib is None
        else round((rss_kib - idle_kib) / phase.streams, 1),
        "cpu_pct_of_one_core": {name: round(100 * share) for name, share in phase.cpu.items()},
        # Under load the server never waits idle for a token: its CPU per token delivered
        # (each reply's own work, its start and its end, spread over its tokens).
        "server_cpu_us_per_token": round(phase.cpu["server"] * window / phase.tokens * 1e6)
        if phase.tokens and "server" in phase.cpu
        else None,
        "machine": phase.machine,
    }


async def _measure(
    args: argparse.Namespace, configurations: list[Target], secret: str, shape: ReplyShape
) -> dict[str, Any]:
    upstream = next(c for c in configurations if c.name == DIRECT)
    slots = make_slots(max(args.levels), secret, "capacity")
    turns_per_level = math.ceil((args.ramp_seconds + args.window_seconds) / shape.seconds(0)) + 1
    idle_kib: dict[str, int] = {}
    warmup_failures: dict[str, int] = {}
    levels: dict[str, dict[str, Any]] = {}
    running = list(configurations)
    warm = slots[: min(WARMUP_STREAMS, max(args.levels))]
    try:
        for configuration in configurations:
            # Every client's conversations first: what they leave in memory is part of idle.
            if configuration.speaks_ours:
                started = time.monotonic()
                await _prepare(configuration, slots, args.levels, turns_per_level)
                print(
                    f"prepared {len(slots)} clients' conversations on {configuration.name} in "
                    f"{time.monotonic() - started:.0f} s",
                    flush=True,
                )
            if failed := await _warm_up(configuration, warm, shape):
                warmup_failures[configuration.name] = failed
                print(f"warning: {failed} warm-up streams failed on {configuration.name}")
        await _quiet(configurations)
        for configuration in configurations:
            idle_kib[configuration.name] = await _idle_rss_kib(configuration)
        print(
            "idle: " + ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in idle_kib.items()),
            flush=True,
        )
        for level_index, level in enumerate(args.levels):
            if not running:
                break
            order = rotated(running, level_index)
            levels[str(level)] = {"order": [c.name for c in order], "configurations": {}}
            for configuration in order:
                quiet = await _quiet(configurations)
                rss_before_kib = rss_kib(configuration.pids())
                phase = await _phase(configuration, upstream, slots[:level], shape, args)
                if not all(is_alive(pid) for pid in (configuration.pid, upstream.pid)):
                    phase.failures.append(("server_exited", "the server died during the phase"))
                row = _summarize(phase, idle_kib[configuration.name], shape, args)
                row["quiet_before"] = quiet
                row["rss_before_mib"] = round(rss_before_kib / 1024, 1)
                levels[str(level)]["configurations"][configuration.name] = row
                _progress(configuration.name, row)
                if not is_alive(upstream.pid):
                    raise RuntimeError("the fake upstream exited during the run")
                if not row["passed"]:
                    running.remove(configuration)
    finally:
        for slot in slots:
            slot.close()
    return {"idle_rss_kib": idle_kib, "warmup_failures": warmup_failures, "levels": levels}


def _progress(name: str, row: dict[str, Any]) -> None:
    gap = row["gap_ms"]
    cpu = row["cpu_pct_of_one_core"]
    print(
        f"  {row['streams']:5} streams {name:14} gap p50/p95/p99 {fmt(gap['p50'])} / "
        f"{fmt(gap['p95'])} / {fmt(gap['p99'])}, {row['failures']} failures, "
        f"{row['tokens_per_s']:g} tokens/s, {fmt(row['kib_per_stream'], ' KiB')}/stream, "
        f"CPU server {cpu.get('server')}% upstream {cpu.get('upstream')}% client "
        f"{cpu.get('client')}% -> {'pass' if row['passed'] else 'FAIL'}",
        flush=True,
    )


# ---------------------------------------------------------------- report


def _capacity(levels: dict[str, dict[str, Any]], name: str) -> int:
    passed = [
        int(level)
        for level, entry in levels.items()
        if entry["configurations"].get(name, {}).get("passed")
    ]
    return max(passed, default=0)


def _memory_per_stream(levels: dict[str, dict[str, Any]], name: str) -> tuple[int, float] | None:
    """KiB per open stream at the highest level passed (the most streams, the least noise),
    else at the highest level run."""
    rows = [
        (int(level), entry["configurations"][name])
        for level, entry in levels.items()
        if name in entry["configurations"]
    ]
    rows = [(level, row) for level, row in rows if row["kib_per_stream"] is not None]
    passed = [(level, row) for level, row in rows if row["passed"]]
    chosen = max(passed or rows, default=None, key=lambda item: item[0])
    return None if chosen is None else (chosen[0], chosen[1]["kib_per_stream"])


def _targets(levels: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    for name in names:
        if not is_ours(name):
            continue
        capacity = _capacity(levels, name)
        targets[f"{name}: capacity >= {TARGET_STREAMS} streams"] = {
            "met": capacity >= TARGET_STREAMS,
            "measured": capacity,
        }
        memory = _memory_per_stream(levels, name)
        targets[f"{name}: memory per open stream < {TARGET_KIB_PER_STREAM} KiB"] = {
            "met": memory is not None and memory[1] < TARGET_KIB_PER_STREAM,
            "measured": None if memory is None else memory[1],
            "at_streams": None if memory is None else memory[0],
        }
    return targets


def _ratios_to_lean(
    levels: dict[str, dict[str, Any]], capacity: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """Each of ours over the lean server on the same database: capacity, and memory per open
    stream (each at its own highest level passed)."""
    ratios: dict[str, dict[str, Any]] = {}
    for name in capacity:
        lean = lean_peer(name)
        if lean not in capacity:
            continue
        ours, theirs = _memory_per_stream(levels, name), _memory_per_stream(levels, lean)
        ratios[name] = {
            "against": lean,
            "capacity": round(capacity[name] / capacity[lean], 2) if capacity[lean] else None,
            "kib_per_stream": round(ours[1] / theirs[1], 2)
            if ours is not None and theirs is not None and theirs[1] > 0
            else None,
        }
    return ratios


def _markdown(result: dict[str, Any]) -> str:
    method = result["method"]
    reply = method["reply"]
    lines = [
        "### Capacity: concurrent streams on one worker",
        "",
        f"Each client keeps one stream open at all times: replies of {reply['tokens']} tokens at "
        f"{reply['per_second']:g} tokens/s after {method['ttft_ms']:g} ms, from the fake "
        f"upstream. Levels go up ({', '.join(str(level) for level in method['levels'])} "
        "streams); at each, every configuration still passing runs alone, in an order that "
        f"rotates, for a {method['ramp_s']:g} s ramp and a {method['window_s']:g} s counted "
        "window. Gap = time between consecutive content tokens as they reach the client (the "
        "wait for the first token is not one: see TTFT). A level is passed with no failure, "
        f"a p95 gap of at most {method['max_p95_gap_ms']:g} ms, at least "
        f"{QUEUED_SHARE:.0%} of the tokens/s offered delivered (streams waiting for their "
        "first token are not held)"
        + (
            f" and a p95 TTFT of at most {method['max_p95_ttft_ms']:g} ms"
            if method["max_p95_ttft_ms"] is not None
            else ""
        )
        + ". Tokens/s: delivered in the window, and its share of what the streams would get "
        "with every reply on time. KiB/stream = (median RSS of the server's processes in the "
        "window - idle RSS) / streams. us/token: the server's CPU in the window over the "
        "tokens it delivered (the replies' starts and ends spread over their tokens)."
        + (f" LiteLLM {result['litellm_version']}." if result["litellm_version"] else "")
        + f" The server, the fake upstream and the client share the machine's {result['cores']}"
        " cores, so their CPU shares (% of one core: server / upstream / client) bound the "
        "result; `direct` is the harness's own ceiling, `lean-*` the lean reference server "
        "(`bench/lean.py`: the essential work of a turn only), the floor ours is held against; "
        "`lean-postgres-decoupled-aiohttp` the same producing each reply in a task of its own "
        "that the response follows, as a reply that outlives its client must be.",
        "",
        "| streams | configuration | gap p50 | gap p95 | gap p99 | TTFT p95 | failures "
        "| tokens/s | RSS | KiB/stream | CPU server / upstream / client | us/token | passed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for level in result["levels"].values():
        for name, row in level["configurations"].items():
            gap, cpu = row["gap_ms"], row["cpu_pct_of_one_core"]
            shares = " / ".join(
                f"{cpu[key]}%" if key in cpu else "-" for key in ("server", "upstream", "client")
            )
            share = row["delivered_share"]
            lines.append(
                f"| {row['streams']} | {name} | {fmt(gap['p50'])} | {fmt(gap['p95'])} "
                f"| {fmt(gap['p99'])} | {fmt(row['ttft_ms']['p95'])} | {row['failures']} "
                f"| {row['tokens_per_s']:g} ({share:.0%}) | {fmt(row['rss_mib'], ' MiB')} "
                f"| {fmt(row['kib_per_stream'], '')} | {shares} "
                f"| {fmt(row.get('server_cpu_us_per_token'), '')} "
                f"| {'yes' if row['passed'] else 'no'} |"
            )
    pool = method["ours_upstream_max_connections"]
    if any(is_ours(name) for name in result["capacity"]) and max(method["levels"]) > pool:
        notes.append(
            f"- note: ours relays at most {pool} replies to the upstream at once "
            "(CHATBOT_UPSTREAM_MAX_CONNECTIONS, passed through from this environment); streams "
            "beyond that wait for a connection before their first token."
        )
    lines += ["", *notes, *([""] if notes else [])]
    highest = max(method["levels"])
    for name, capacity in result["capacity"].items():
        shown = f"{capacity} streams" if capacity else "none of the levels"
        if capacity == highest:
            shown += " (the highest level tried)"
        lines.append(f"- capacity of {name}: {shown}")
    for name, ratio in result["ratio_ours_to_litellm_capacity"].items():
        lines.append(f"- {name} / LiteLLM capacity: {'-' if ratio is None else f'{ratio:.2f}'}")
    for name, ratio in result.get("ratio_ours_to_lean", {}).items():
        capacity, memory = ratio["capacity"], ratio["kib_per_stream"]
        lines.append(
            f"- {name} / {ratio['against']}: capacity "
            f"{'-' if capacity is None else f'{capacity:.2f}'}, memory per open stream "
            f"{'-' if memory is None else f'{memory:.2f}'}"
        )
    lines.append("")
    for name, target in result["targets"].items():
        measured = target["measured"]
        if "at_streams" in target and measured is not None:
            figure = f"{measured:g} KiB at {target['at_streams']} streams"
        elif measured is not None:
            figure = f"{measured} streams"
        else:
            figure = "not measured"
        lines.append(f"- {name}: {'met' if target['met'] else 'NOT met'} ({figure})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shape = ReplyShape(MODEL, args.tokens, args.tokens_per_second)
    with Servers(
        workdir,
        args.targets,
        [shape, FIRST_TURN_SHAPE],
        args.ttft_ms,
        args.database_url,
        args.pg_database,
        args.peers_venv,
    ) as servers:
        configurations = [
            Target.of(server, servers.master_key) for server in servers.servers.values()
        ]
        print(
            f"measuring {', '.join(c.name for c in configurations)} at "
            f"{', '.join(map(str, args.levels))} streams; logs in {workdir}",
            flush=True,
        )
        measured = run_client_loop(_measure(args, configurations, servers.jwt_secret, shape))
        litellm_version = servers.litellm_version()
    levels = measured["levels"]
    names = [configuration.name for configuration in configurations]
    capacity = {name: _capacity(levels, name) for name in names}
    ratios: dict[str, float | None] = {}
    if LITELLM in capacity:
        for name in names:
            if is_ours(name):
                theirs = capacity[LITELLM]
                ratios[name] = round(capacity[name] / theirs, 2) if theirs else None
    return {
        "measured_at": measured_at(),
        "cores": os.cpu_count(),
        "litellm_version": litellm_version,
        "ratio_ours_to_lean": _ratios_to_lean(levels, capacity),
        "method": {
            "reply": shape.describe(),
            "ttft_ms": args.ttft_ms,
            "levels": args.levels,
            "ramp_s": args.ramp_seconds,
            "window_s": args.window_seconds,
            "max_p95_gap_ms": args.max_p95_gap_ms,
            "max_p95_ttft_ms": args.max_p95_ttft_ms,
            "ours_upstream_max_connections": int(
                os.environ.get(
                    "CHATBOT_UPSTREAM_MAX_CONNECTIONS",
                    Settings.model_fields["upstream_max_connections"].default,
                )
            ),
            "open_files_limit": args.open_files_limit,
        },
        "idle_rss_mib": {
            name: round(kib / 1024, 1) for name, kib in measured["idle_rss_kib"].items()
        },
        "warmup_failures": measured["warmup_failures"],
        "levels": levels,
        "capacity": capacity,
        "ratio_ours_to_litellm_capacity": ratios,
        "targets": _targets(levels, names),
    }


def main() -> None:
    parser = scenario_parser(
        __doc__,
        "bench_capacity",
        [DIRECT, *OURS, "lean-postgres-aiohttp", "lean-postgres-decoupled-aiohttp", LITELLM],
    )
    parser.add_argument(
        "--levels",
        type=comma_list(int),
        default=[100, 200, 400, 800, 1000, 1500, 2000, 3000],
        help="concurrent streams, tried in ascending order",
    )
    parser.add_argument("--tokens", type=int, default=100, help="tokens in each reply")
    parser.add_argument("--tokens-per-second", type=float, default=20, help="pace of each reply")
    parser.add_argument(
        "--window-seconds", type=float, default=10, help="counted time at each level"
    )
    parser.add_argument(
        "--ramp-seconds", type=float, default=5, help="the clients start spread over this"
    )
    parser.add_argument(
        "--max-p95-gap-ms",
        type=float,
        default=100,
        help="a level is passed with no failure and a p95 gap between tokens at most this",
    )
    parser.add_argument(
        "--max-p95-ttft-ms",
        type=float,
        default=None,
        help="also require a p95 time to first token at most this (off by default)",
    )
    add_streaming_options(parser)
    args = parse_scenario_args(parser)
    args.levels = sorted(set(args.levels))
    if not args.levels or args.levels[0] < 1:
        parser.error("--levels: at least one level, each at least 1")
    args.open_files_limit = raise_open_files_limit()

    _, workdir = run_scenario(SCENARIO, "capacity", args, run, _markdown)
    finish(workdir, args.keep)


if __name__ == "__main__":
    main()
