"""Throughput: completed JSON turns a second at 64 concurrent clients, with an instant upstream.

The fake upstream (`bench/harness/upstream.py`) answers at once: no wait before the first
token, the whole reply in one go. What is left is the cost of a turn to the service itself:
the request, its checks, the claim of the conversation, the history, the two stored messages,
the call to the model, the stored reply. Configurations: the service on SQLite and on
PostgreSQL, with one worker process and with two (`--workers 2`), the lean reference server on
PostgreSQL (`bench/lean.py`: the essential work of a turn only, one worker, the floor ours is
held against), and the upstream called directly (the limit of this machine with this client).

Each client is a user of its own: it opens a conversation with a first turn (`POST /v1/chat`,
titled, so no title is generated), sends `--turns-per-conversation` turns into it (`POST
/v1/conversations/{id}/messages`, JSON, the reply's full text in the response), then opens the
next one. All clients move to one configuration at a time; each phase runs `--warmup-seconds`
unmeasured, then counts the turns that complete in `--window-seconds`. Rounds repeat with the
order of configurations rotated, and the report gives the median over rounds, so that noise
from the shared machine falls on every configuration alike. The client, the upstream and the
service share the machine's two cores: the client's share is reported with the results.

    python bench/throughput.py                  # the full scenario, about 4 minutes
    python bench/throughput.py --rounds 1 --window-seconds 5 --targets ours-sqlite

Writes its part of bench/results/latest.json (key "throughput") and of latest.md.
Exits non-zero when a turn fails.
"""

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clients import TurnError, run_client_loop, user_token
from harness.processes import MachineLoad, cpu_seconds
from harness.report import measured_at, percentiles
from harness.scenario import finish, parse_scenario_args, rotated, run_scenario, scenario_parser
from harness.servers import DIRECT, Server, Servers, lean_peer, speaks_ours
from harness.targets import Slot
from harness.upstream import ReplyShape

SCENARIO = "throughput"
MODEL = "bench-instant"
CONFIGURATIONS = [
    DIRECT,
    "ours-sqlite",
    "ours-sqlite-x2",
    "ours-postgres",
    "ours-postgres-x2",
    "lean-postgres-aiohttp",
]


@dataclass
class Client(Slot):
    """A client of its own user, with the conversation it is filling on each configuration
    (None: the next turn opens a new one)."""

    conversation: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Phase:
    """One configuration's turn with every client: when counting starts and ends."""

    counted_from: float
    counted_to: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _request(server: Server, client: Client, turns_per_conversation: int) -> tuple[str, bytes]:
    number = client.turns[server.name] = client.turns.get(server.name, 0) + 1
    text = f"client {client.index} turn {number}: what is the capital of France?"
    if not speaks_ours(server.name):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        return "/v1/chat/completions", json.dumps(body).encode()
    conversation = client.conversation.get(server.name)
    if conversation is None or number % turns_per_conversation == 0:
        client.conversation[server.name] = None
        return "/v1/chat", json.dumps({"message": text, "title": "bench"}).encode()
    return f"/v1/conversations/{conversation}/messages", json.dumps({"content": text}).encode()


async def _turn(server: Server, client: Client, turns_per_conversation: int) -> None:
    connection = client.connection(server.name, server.port)
    path, body = _request(server, client, turns_per_conversation)
    headers = {"Authorization": f"Bearer {client.token}"}
    status, payload = await connection.post_whole(path, body, headers)
    if status not in (200, 201):
        raise TurnError(f"{server.name} {path}: HTTP {status}: {payload[:200]!r}")
    if speaks_ours(server.name):
        answer = json.loads(payload)
        if answer["assistant_message"]["status"] != "completed":
            raise TurnError(f"{server.name}: reply {answer['assistant_message']['status']}")
        if path == "/v1/chat":
            client.conversation[server.name] = answer["conversation_id"]


async def _phase(
    server: Server, clients: list[Client], args: argparse.Namespace
) -> tuple[Phase, dict[str, float]]:
    started = time.monotonic()
    phase = Phase(
        started + args.warmup_seconds, started + args.warmup_seconds + args.window_seconds
    )

    async def run(client: Client) -> None:
        while (now := time.monotonic()) < phase.counted_to:
            try:
                await _turn(server, client, args.turns_per_conversation)
            except (TurnError, OSError, ValueError, KeyError, asyncio.IncompleteReadError) as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.1)
                continue
            done = time.monotonic()
            if phase.counted_from <= done <= phase.counted_to:
                phase.latencies_ms.append((done - now) * 1000)

    async def cpu_of_window() -> dict[str, float]:
        await asyncio.sleep(max(0.0, phase.counted_from - time.monotonic()))
        before, load = cpu_seconds(server.pids()), MachineLoad()
        await asyncio.sleep(max(0.0, phase.counted_to - time.monotonic()))
        used = cpu_seconds(server.pids()) - before
        return {"server_cores": round(used / args.window_seconds, 2)} | load.report()

    cpu = asyncio.create_task(cpu_of_window())
    await asyncio.gather(*(run(client) for client in clients))
    return phase, await cpu


async def _measure(
    args: argparse.Namespace, servers: list[Server], secret: str
) -> dict[str, dict[str, Any]]:
    clients = [
        Client(index, user_token(secret, f"bench-throughput-{index}"))
        for index in range(args.clients)
    ]
    rows: dict[str, dict[str, Any]] = {
        server.name: {"rounds": [], "latencies_ms": [], "errors": []} for server in servers
    }
    try:
        for number in range(args.rounds):
            for server in rotated(servers, number):
                phase, load = await _phase(server, clients, args)
                turns_per_second = len(phase.latencies_ms) / args.window_seconds
                row = rows[server.name]
                row["rounds"].append({"turns_per_second": round(turns_per_second, 1)} | load)
                row["latencies_ms"] += phase.latencies_ms
                row["errors"] += phase.errors
                print(
                    f"  round {number + 1} {server.name:17} {turns_per_second:7.1f} turns/s, "
                    f"server {load['server_cores']:.2f} cores, client {load['client_cores']:.2f}"
                    f" ({len(phase.errors)} errors)",
                    flush=True,
                )
                for client in clients:
                    client.close()
    finally:
        for client in clients:
            client.close()
    return rows


def _summary(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for name, row in rows.items():
        rates = [entry["turns_per_second"] for entry in row["rounds"]]
        summary[name] = {
            "turns_per_second": round(statistics.median(rates), 1),
            "turns_per_second_by_round": rates,
            "latency_ms": percentiles(row["latencies_ms"]),
            "server_cores": statistics.median(entry["server_cores"] for entry in row["rounds"]),
            "client_cores": statistics.median(entry["client_cores"] for entry in row["rounds"]),
            "cores_busy": statistics.median(entry["cores_busy"] for entry in row["rounds"]),
            "errors": len(row["errors"]),
            "first_errors": row["errors"][:5],
        }
    return summary


def _ratio(summary: dict[str, dict[str, Any]], top: str, bottom: str) -> float | None:
    if top not in summary or bottom not in summary or not summary[bottom]["turns_per_second"]:
        return None
    return round(summary[top]["turns_per_second"] / summary[bottom]["turns_per_second"], 2)


def _markdown(result: dict[str, Any]) -> str:
    summary = result["configurations"]
    lines = [
        "### Throughput: JSON turns a second",
        "",
        f"{result['clients']} concurrent clients, each a user of its own sending JSON turns "
        f"back to back (a new titled conversation every {result['turns_per_conversation']} "
        "turns); the upstream answers at once. Median of "
        f"{result['rounds']} rounds of {result['window_seconds']:g} s, configurations "
        "interleaved. All processes share the machine's "
        f"{result['cores']} cores; `client` is the load generator's share.",
        "",
        "| configuration | turns/s | vs 1 worker | latency p50 | latency p95 | server CPU "
        "| client CPU | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in summary.items():
        base = name.removesuffix("-x2")
        scale = _ratio(summary, name, base) if name != base else None
        lines.append(
            f"| {name} | {row['turns_per_second']:,.0f} | {f'{scale:.2f}x' if scale else '-'} "
            f"| {row['latency_ms']['p50'] or 0:.0f} ms | {row['latency_ms']['p95'] or 0:.0f} ms "
            f"| {row['server_cores']:.2f} cores | {row['client_cores']:.2f} cores "
            f"| {row['errors']} |"
        )
    to_lean = result["ratios"].get("ours_to_lean", {})
    lines += [""] if to_lean else []
    for name, ratio in to_lean.items():
        shown = "-" if ratio is None else f"{ratio:.2f}x the turns/s"
        lines.append(f"- {name} / {lean_peer(name)} (one worker each): {shown}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shape = ReplyShape(MODEL, args.reply_tokens, 1e6)
    with Servers(workdir, args.targets, [shape], 0, args.database_url, args.pg_database) as servers:
        listed = [servers.servers[name] for name in args.targets if name in servers.servers]
        print(f"measuring {', '.join(s.name for s in listed)}; logs in {workdir}", flush=True)
        rows = run_client_loop(_measure(args, listed, servers.jwt_secret))
        servers.check_alive()
    summary = _summary(rows)
    return {
        "measured_at": measured_at(),
        "cores": os.cpu_count(),
        "clients": args.clients,
        "rounds": args.rounds,
        "window_seconds": args.window_seconds,
        "turns_per_conversation": args.turns_per_conversation,
        "upstream": shape.describe() | {"ttft_ms": 0},
        "configurations": summary,
        "ratios": {
            "sqlite_two_workers_to_one": _ratio(summary, "ours-sqlite-x2", "ours-sqlite"),
            "postgres_two_workers_to_one": _ratio(summary, "ours-postgres-x2", "ours-postgres"),
            "postgres_to_sqlite": _ratio(summary, "ours-postgres", "ours-sqlite"),
            "ours_to_lean": {
                name: _ratio(summary, name, lean)
                for name in summary
                if (lean := lean_peer(name)) is not None and lean in summary
            },
        },
    }


def main() -> None:
    parser = scenario_parser(__doc__, "chatbot_bench_throughput", CONFIGURATIONS)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--reply-tokens", type=int, default=20)
    parser.add_argument("--turns-per-conversation", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-seconds", type=float, default=3)
    parser.add_argument("--window-seconds", type=float, default=10)
    args = parse_scenario_args(parser)

    result, workdir = run_scenario(SCENARIO, "throughput", args, run, _markdown)
    errors = sum(row["errors"] for row in result["configurations"].values())
    finish(workdir, args.keep, f"{errors} turns failed" if errors else None)


if __name__ == "__main__":
    main()
