"""CPU per turn: the server's own CPU time for one chat turn, ours against the lean server.

Not wall clock: the CPU seconds (user + system, from /proc) that a server's processes spend on
a batch of turns, divided by the turns. Each configuration runs one worker with JWT on, relaying
to the fake upstream (`bench/harness/upstream.py`), which answers at once: no wait before the
first token. One client sends the turns one after the other over one keep-alive HTTP/1.1
connection, into conversations created beforehand and already past their first turn (titled, on
ours), several for each kind of turn so that none grows long. Three kinds of turn:

- JSON: the reply waited for and answered whole (no `Accept: text/event-stream`), 1 token;
- streamed, 100 tokens: SSE, every content delta its own event;
- streamed, 1 token: the same with a 1-token reply; per relayed token = (100 tokens - 1 token)
  / 99, within each round.

Configurations: ours on SQLite and on PostgreSQL (`chatbot serve`), and the lean reference server
(`bench/lean.py`: the essential work of a turn and nothing more) on each, reading the upstream
through aiohttp's C parser as ours does (`-aiohttp`) and through httpx2. Each round, every
configuration takes `--turns` turns of each kind, in an order that rotates from round to round;
the report gives the median over rounds, and ours / lean for each database. A batch's counters
are read after the servers went quiet and again a moment after its last turn (its last writes
counted). The upstream's CPU is not counted, nor PostgreSQL's own processes (SQLite works inside
the server, so its share is in the SQLite figures).

The long reply's tokens come all in one go by default: what relaying costs a busy server. Paced
(`--tokens-per-second`), each token wakes an otherwise idle process, and on this kind of machine
that costs several times more user CPU per token (cold caches), whatever the server.

    python bench/cpu.py                          # the full scenario, about 3 minutes
    python bench/cpu.py --quick                  # a quick look, about a minute
    python bench/cpu.py --rounds 2 --turns 30 --targets ours-sqlite,lean-sqlite

Writes its part of bench/results/latest.json (key "turn_cpu") and of latest.md. Exits non-zero
when a turn fails.
"""

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from harness.clients import RawStream, TurnError, run_client_loop, sse_events
from harness.processes import cpu_seconds, wait_quiet
from harness.report import measured_at, met_lines
from harness.scenario import finish, rotated, run_scenario, scenario_parser
from harness.servers import LEAN, OURS, Servers, is_lean, is_ours, speaks_ours
from harness.targets import Slot, Target, make_slots, prepare_conversations
from harness.upstream import ReplyShape

SCENARIO = "turn_cpu"
CONFIGURATIONS = [*OURS, *LEAN, *(f"{name}-aiohttp" for name in LEAN)]
SHORT = ReplyShape("bench-cpu-short", 1, math.inf)
KINDS = ("json", "stream_1", "stream_long")
LABELS = {
    "json": "JSON turn",
    "stream_1": "streamed, 1 token",
    "stream_long": "streamed, {n} tokens",
}
TURNS_PER_CONVERSATION = 16
"""Measured turns a conversation takes: its history stays short (no summaries)."""
SETTLE_S = 0.05
"""After a batch's last turn, before its counters are read: the last writes land."""
TARGETS = {"json": 4.0, "stream_long": 10.0}
"""Ours' targets, CPU milliseconds: a JSON turn, a streamed turn of 100 tokens..."""
TARGET_US_PER_TOKEN = 60.0
"""...and each relayed token, microseconds."""


def _label(kind: str, tokens: int) -> str:
    return LABELS[kind].format(n=tokens)


# ---------------------------------------------------------------- one turn


async def _json_turn(target: Target, slot: Slot, expected: str) -> None:
    connection = slot.connection(target.name, target.port)
    path, body, headers = target.request(slot, SHORT.model)
    del headers["Accept"]  # JSON, once the reply has ended
    status, payload = await connection.post_whole(path, body, headers)
    if status != 201:
        raise TurnError(f"{target.name}: HTTP {status}: {payload[:300]!r}")
    reply = json.loads(payload)["assistant_message"]
    if reply["status"] != "completed" or reply["content"] != expected:
        raise TurnError(f"{target.name}: reply {reply['status']}: {reply['content'][:100]!r}")


async def _stream_turn(target: Target, slot: Slot, model: str, tokens: int) -> None:
    connection = slot.connection(target.name, target.port)
    path, body, headers = target.request(slot, model)  # the conversation's model, on ours
    deltas, ended, buffer = 0, False, bytearray()
    try:
        status = await connection.post(path, body, headers)
        if status != 200:
            text = b"".join([chunk async for chunk in connection.body()])
            raise TurnError(f"{target.name}: HTTP {status}: {text[:300]!r}")
        async for chunk in connection.body():
            buffer += chunk
            for name, data in sse_events(buffer):
                if name == "error":
                    raise TurnError(f"{target.name}: error event: {data[:300]}")
                deltas += name == "delta"
                ended = ended or name == "done"
    except BaseException:
        connection.close()
        raise
    if not ended or deltas != tokens:
        raise TurnError(f"{target.name}: {deltas} of {tokens} deltas, done: {ended}")


# ---------------------------------------------------------------- the rounds


class Kinds:
    """The three kinds of turn of one client: a user of its own for each, so that each has
    conversations of its reply's model, all over one connection to each configuration."""

    def __init__(self, secret: str, long: ReplyShape) -> None:
        self.long = long
        self.slots = dict(zip(KINDS, make_slots(len(KINDS), secret, "cpu"), strict=True))
        shared: dict[str, RawStream] = {}
        for slot in self.slots.values():
            slot.connections = shared

    def model(self, kind: str) -> str:
        return self.long.model if kind == "stream_long" else SHORT.model

    async def turn(self, target: Target, kind: str) -> None:
        slot = self.slots[kind]
        if kind == "json":
            await _json_turn(target, slot, SHORT.text())
        else:
            tokens = self.long.tokens if kind == "stream_long" else SHORT.tokens
            await _stream_turn(target, slot, self.model(kind), tokens)

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()


async def _batch(
    target: Target, kinds: Kinds, kind: str, turns: int
) -> tuple[float, float, list[str]]:
    """`turns` turns of one kind: server CPU ms and wall ms per turn, and the errors."""
    await kinds.slots[kind].connection(target.name, target.port).open()
    errors: list[str] = []
    pids = target.pids()
    before, started = cpu_seconds(pids), time.perf_counter()
    for _ in range(turns):
        try:
            await asyncio.wait_for(kinds.turn(target, kind), 30)
        except Exception as exc:
            errors.append(f"{kind}: {exc!r}"[:300])
    wall = time.perf_counter() - started
    await asyncio.sleep(SETTLE_S)
    used = cpu_seconds(pids) - before
    return 1000 * used / turns, 1000 * wall / turns, errors


async def _measure(
    args: argparse.Namespace, targets: list[Target], secret: str, long: ReplyShape
) -> dict[str, Any]:
    kinds = Kinds(secret, long)
    per_kind = args.rounds * args.turns + args.warmup_turns
    conversations = max(1, math.ceil(per_kind / TURNS_PER_CONVERSATION))
    for kind, slot in kinds.slots.items():
        await prepare_conversations(targets, [slot], kinds.model(kind), conversations, SHORT.model)
    rows: dict[str, dict[str, Any]] = {
        target.name: {
            "cpu_ms": {kind: [] for kind in KINDS},
            "wall_ms": {kind: [] for kind in KINDS},
            "errors": [],
        }
        for target in targets
    }
    try:
        for target in targets if args.warmup_turns else []:
            for kind in KINDS:
                *_, errors = await _batch(target, kinds, kind, args.warmup_turns)
                rows[target.name]["errors"] += errors
        all_pids = [pid for target in targets for pid in target.pids()]
        # Titles of the new conversations, on ours, are written after their first replies.
        await wait_quiet(all_pids)
        for target in targets:
            rows[target.name]["idle_cpu_ms_per_s"] = await _idle(target)
        for number in range(args.rounds):
            for target in rotated(targets, number):
                await wait_quiet(all_pids, 10)
                row = rows[target.name]
                for kind in KINDS:
                    cpu_ms, wall_ms, errors = await _batch(target, kinds, kind, args.turns)
                    row["cpu_ms"][kind].append(round(cpu_ms, 3))
                    row["wall_ms"][kind].append(round(wall_ms, 3))
                    row["errors"] += errors
                _progress(number, target.name, row, long.tokens)
    finally:
        kinds.close()
    return {"conversations_per_kind": conversations, "rows": rows}


async def _idle(target: Target, seconds: float = 2) -> float:
    """What the server spends doing nothing (its timers), CPU ms a second."""
    before = cpu_seconds(target.pids())
    await asyncio.sleep(seconds)
    return round(1000 * (cpu_seconds(target.pids()) - before) / seconds, 2)


def _progress(number: int, name: str, row: dict[str, Any], tokens: int) -> None:
    cpu = row["cpu_ms"]
    per_token = _per_token(cpu["stream_long"][-1], cpu["stream_1"][-1], tokens)
    print(
        f"  round {number + 1} {name:22} JSON {cpu['json'][-1]:.2f} ms, streamed 1 token "
        f"{cpu['stream_1'][-1]:.2f} ms, {tokens} tokens {cpu['stream_long'][-1]:.2f} ms, "
        f"{per_token:.1f} us/token ({len(row['errors'])} errors)",
        flush=True,
    )


def _per_token(long_ms: float, short_ms: float, tokens: int) -> float:
    """Microseconds per relayed token: the long stream's extra CPU over its extra tokens."""
    return 1000 * (long_ms - short_ms) / (tokens - SHORT.tokens)


# ---------------------------------------------------------------- report


def _summary(rows: dict[str, dict[str, Any]], tokens: int) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, row in rows.items():
        cpu = row["cpu_ms"]
        per_token = [
            round(_per_token(long, short, tokens), 2)
            for long, short in zip(cpu["stream_long"], cpu["stream_1"], strict=True)
        ]
        summary[name] = {
            "cpu_ms_per_turn": {kind: _median(cpu[kind], 3) for kind in KINDS},
            "cpu_us_per_token": _median(per_token, 1),
            "wall_ms_per_turn": {kind: _median(row["wall_ms"][kind], 2) for kind in KINDS},
            "cpu_ms_per_turn_by_round": cpu,
            "cpu_us_per_token_by_round": per_token,
            "idle_cpu_ms_per_s": row.get("idle_cpu_ms_per_s"),
            "errors": len(row["errors"]),
            "first_errors": row["errors"][:5],
        }
    return summary


def _median(values: list[float], digits: int) -> float | None:
    return round(statistics.median(values), digits) if values else None


def _figures(row: dict[str, Any]) -> dict[str, float | None]:
    return {**row["cpu_ms_per_turn"], "per_token": row["cpu_us_per_token"]}


def _ratios(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each of ours over each lean configuration on the same database."""
    ratios: dict[str, dict[str, float | None]] = {}
    for ours in (name for name in summary if is_ours(name)):
        database = ours.removeprefix("ours-")
        for lean in summary:
            if is_lean(lean) and lean.removeprefix("lean-").split("-")[0] == database:
                mine, theirs = _figures(summary[ours]), _figures(summary[lean])
                ratios[f"{ours} / {lean}"] = {
                    key: round(value / theirs[key], 2)
                    if value is not None and theirs[key]
                    else None
                    for key, value in mine.items()
                }
    return ratios


def _targets_met(summary: dict[str, dict[str, Any]], tokens: int) -> dict[str, bool]:
    met: dict[str, bool] = {}
    for name, row in summary.items():
        if not is_ours(name):
            continue
        cpu = row["cpu_ms_per_turn"]
        if cpu["json"] is not None:
            met[f"{name}: JSON turn <= {TARGETS['json']:g} ms CPU"] = cpu["json"] <= TARGETS["json"]
        if row["cpu_us_per_token"] is not None:
            met[f"{name}: per relayed token <= {TARGET_US_PER_TOKEN:g} us CPU"] = (
                row["cpu_us_per_token"] <= TARGET_US_PER_TOKEN
            )
        if cpu["stream_long"] is not None and tokens == 100:
            met[f"{name}: 100-token streamed turn <= {TARGETS['stream_long']:g} ms CPU"] = (
                cpu["stream_long"] <= TARGETS["stream_long"]
            )
    return met


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}{unit}" if unit == " us" else f"{value:.2f}{unit}"


def _markdown(result: dict[str, Any]) -> str:
    method = result["method"]
    tokens = method["long_reply"]["tokens"]
    pace = method["long_reply"]["per_second"]
    headers = [_label(kind, tokens) for kind in KINDS]
    lines = [
        "### CPU per turn: ours and the lean server",
        "",
        "Server CPU time (user + system of its processes, from /proc) per turn, not wall clock: "
        "one worker, JWT on, one client sending turns one after the other over a keep-alive "
        "connection into titled conversations; the fake upstream answers at once ("
        + ("all tokens in one go" if pace == math.inf else f"{pace:g} tokens/s")
        + "). Median of "
        f"{method['rounds']} rounds of {method['turns']} turns of each kind, configurations "
        "interleaved. Per relayed token = (streamed, "
        f"{tokens} tokens - streamed, 1 token) / {tokens - 1}. `lean-*` is `bench/lean.py`, "
        "the essential work of a turn only; `-aiohttp` reads the upstream through aiohttp's C "
        "parser as ours does, the others through httpx2. PostgreSQL's own processes are not "
        "counted; SQLite works inside the server.",
        "",
        "| configuration | " + " | ".join(headers) + " | per relayed token | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["configurations"].items():
        cpu = row["cpu_ms_per_turn"]
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(cpu[kind], " ms") for kind in KINDS)
            + f" | {_cell(row['cpu_us_per_token'], ' us')} | {row['errors']} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "| ours / lean | " + " | ".join(headers) + " | per relayed token |",
            "| --- | --- | --- | --- | --- |",
        ]
        for pair, ratio in result["ratios"].items():
            cells = [ratio[key] for key in (*KINDS, "per_token")]
            lines.append(
                f"| {pair} | "
                + " | ".join("-" if cell is None else f"{cell:.2f}x" for cell in cells)
                + " |"
            )
    lines += ["", *met_lines(result["targets_met"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    long = ReplyShape("bench-cpu-long", args.long_tokens, args.tokens_per_second)
    with Servers(
        workdir, args.targets, [SHORT, long], 0, args.database_url, args.pg_database
    ) as servers:
        targets = [Target.of(servers.servers[name], servers.master_key) for name in args.targets]
        print(f"measuring {', '.join(args.targets)}; logs in {workdir}", flush=True)
        measured = run_client_loop(_measure(args, targets, servers.jwt_secret, long))
        servers.check_alive()
    summary = _summary(measured["rows"], long.tokens)
    return {
        "measured_at": measured_at(),
        "cores": os.cpu_count(),
        "method": {
            "rounds": args.rounds,
            "turns": args.turns,
            "warmup_turns": args.warmup_turns,
            "conversations_per_kind": measured["conversations_per_kind"],
            "short_reply": SHORT.describe(),
            "long_reply": long.describe(),
            "ttft_ms": 0,
            "settle_s": SETTLE_S,
        },
        "configurations": summary,
        "ratios": _ratios(summary),
        "targets_met": _targets_met(summary, long.tokens),
    }


def main() -> None:
    parser = scenario_parser(__doc__, "chatbot_bench_cpu", CONFIGURATIONS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=100, help="turns of each kind a round")
    parser.add_argument("--warmup-turns", type=int, default=20, help="of each kind, unmeasured")
    parser.add_argument("--long-tokens", type=int, default=100, help="the long reply's tokens")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=math.inf,
        help="the long reply's pace (default: at once, all its tokens in one go)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 30 turns, 10 to warm up: a quick look"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.turns, args.warmup_turns = 2, 30, 10
    if not args.targets or any(not speaks_ours(name) for name in args.targets):
        parser.error(f"--targets: configurations of our API, of {', '.join(CONFIGURATIONS)}")
    if args.long_tokens < 2 or args.turns < 1 or args.rounds < 1:
        parser.error("--long-tokens at least 2, --turns and --rounds at least 1")

    result, workdir = run_scenario(SCENARIO, "cpu", args, run, _markdown)
    errors = sum(row["errors"] for row in result["configurations"].values())
    finish(workdir, args.keep, f"{errors} turns failed" if errors else None)


if __name__ == "__main__":
    main()
