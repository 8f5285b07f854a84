"""Growth: the time of a chat turn at 10, 1,000 and 10,000 stored messages.

The service runs as its own process (`chatbot serve`) against an instant fake upstream, on SQLite
and then on PostgreSQL. One conversation of each size is seeded; the long ones have the rolling
summary a conversation of that length would have (everything but its last 60 messages), as in
steady state. Turns then go round them (10, 1,000, 10,000, 10, ...) so that noise on a shared
machine hits every size alike, and the medians are compared. Two times are kept: the round trip
of the JSON request as the client sees it, and the turn's `latency_ms` as the service stored it
(from the request's arrival to the stored reply).

    python bench/growth.py                                   # both databases, about 1 minute
    python bench/growth.py --databases sqlite --turns 50     # a quick look

Writes its part of bench/results/latest.json (key "growth") and of latest.md.
"""

import asyncio
import math
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from harness.databases import database_kind, prepare_database
from harness.processes import free_ports, stop, wait_for_http
from harness.report import measured_at, met_lines, percentiles, publish
from harness.scenario import add_result_options, script_parser
from harness.servers import service_env, start_service
from harness.upstream import BenchUpstream, ReplyShape

from chatbot.conversations.models import Conversation
from chatbot.db import create_engine, create_sessionmaker, migrate, utcnow
from chatbot.messages.models import Message, MessageStatus, Role

REPLY = ReplyShape("bench-growth", 20, math.inf)
"""The upstream answers at once, the whole reply in one go: what is timed is the service."""
SUMMARY_TOKENS = ("A", " summary.")
SCENARIO = "growth"


async def _seed(database_url: str, sizes: list[int]) -> list[str]:
    engine = create_engine(database_url)
    await migrate(engine)
    sessionmaker = create_sessionmaker(engine)
    ids = []
    for size in sizes:
        conversation_id = uuid.uuid4()
        now = utcnow()
        covered = max(0, size - 60)
        async with sessionmaker() as session:
            session.add(
                Conversation(
                    id=conversation_id,
                    user_id="local",
                    title=f"{size} messages",
                    metadata_={},
                    message_count=size,
                    summary="The user and the assistant talked at length." if covered else None,
                    summary_upto_seq=covered,
                    created_at=now,
                    updated_at=now,
                )
            )
            await session.flush()
            for start in range(1, size + 1, 2000):
                session.add_all(
                    Message(
                        conversation_id=conversation_id,
                        seq=seq,
                        role=Role.USER if seq % 2 else Role.ASSISTANT,
                        content=f"message number {seq} of a long conversation",
                        token_count=9,
                        status=MessageStatus.COMPLETED,
                        created_at=now,
                    )
                    for seq in range(start, min(size, start + 1999) + 1)
                )
                await session.flush()
            await session.commit()
        ids.append(str(conversation_id))
    await engine.dispose()
    return ids


async def run(database: str, turns: int, sizes: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        database_url = await prepare_database(database, "chatbot_bench", Path(workdir), "growth")
        conversation_ids = await _seed(database_url, sizes)
        # In this process: its event loop idles while the client waits for each turn.
        upstream = await BenchUpstream([REPLY], 0, utility_tokens=SUMMARY_TOKENS).start()
        port = free_ports(1)[0]
        env = service_env(database_url, upstream.port, port, None, "WARNING")
        env["CHATBOT_RATE_LIMIT"] = ""  # one client sending turns back to back is not abuse
        server = start_service(env)  # started once, before anything is timed
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        server_timings: dict[int, list[float]] = {size: [] for size in sizes}
        try:
            base_url = f"http://127.0.0.1:{port}"
            # In a thread: the fake upstream answers from this event loop.
            await asyncio.to_thread(wait_for_http, f"{base_url}/readyz", server, "the service", 60)
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
                for round_number in range(turns + 20):
                    for size, conversation_id in zip(sizes, conversation_ids, strict=True):
                        started = time.perf_counter()
                        response = await client.post(
                            f"/v1/conversations/{conversation_id}/messages",
                            json={"content": f"turn {round_number}"},
                        )
                        elapsed = (time.perf_counter() - started) * 1000
                        response.raise_for_status()
                        if round_number >= 20:  # the first rounds warm up caches and pools
                            timings[size].append(elapsed)
                            stored = response.json()["assistant_message"]["latency_ms"]
                            server_timings[size].append(float(stored))
                        await asyncio.sleep(0.005)  # let the chores of the turn run
        finally:
            stop(server)
            await upstream.stop()
    medians = {size: statistics.median(values) for size, values in timings.items()}
    server = {size: statistics.median(values) for size, values in server_timings.items()}
    return {
        "turns": turns,
        "round_trip_ms": {str(size): percentiles(values) for size, values in timings.items()},
        "server_ms": {str(size): percentiles(values) for size, values in server_timings.items()},
        "ratio_to_smallest": {
            str(size): round(medians[size] / medians[sizes[0]], 3) for size in sizes
        },
        "server_ratio_to_smallest": {
            str(size): round(server[size] / server[sizes[0]], 3) for size in sizes
        },
    }


def _markdown(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    lines = [
        "### Growth: a turn in a long conversation",
        "",
        f"JSON turns going round conversations of {', '.join(f'{s:,}' for s in sizes)} stored "
        f"messages, {result['turns']} counted turns each, instant upstream. Round trip as the "
        "client sees it; server = the `latency_ms` the service stored.",
        "",
        "| database | messages | round trip p50 | p95 | server p50 | ratio to "
        f"{sizes[0]:,} (round trip) | ratio (server) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for database, row in result["databases"].items():
        for size in sizes:
            trip, server = row["round_trip_ms"][str(size)], row["server_ms"][str(size)]
            lines.append(
                f"| {database} | {size:,} | {trip['p50']:.1f} ms | {trip['p95']:.1f} ms "
                f"| {server['p50']:.0f} ms | {row['ratio_to_smallest'][str(size)]:.2f} "
                f"| {row['server_ratio_to_smallest'][str(size)]:.2f} |"
            )
    lines += ["", *met_lines(result["targets_met"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql://postgres@127.0.0.1:5432/postgres",
        help="'sqlite' and/or PostgreSQL server URLs (chatbot_bench is recreated there)",
    )
    parser.add_argument("--turns", type=int, default=150)
    parser.add_argument("--sizes", default="10,1000,10000")
    add_result_options(parser)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    databases = {}
    for database in args.databases.split(","):
        name = database_kind(database)
        print(f"{name}: {len(sizes)} conversations, {args.turns} turns each", flush=True)
        databases[name] = asyncio.run(run(database, args.turns, sizes))
    largest = str(sizes[-1])
    result = {
        "measured_at": measured_at(),
        "sizes": sizes,
        "turns": args.turns,
        "databases": databases,
        "targets_met": {
            f"{name}: a turn at {sizes[-1]:,} messages within 1.2x of one at {sizes[0]:,}": (
                row["ratio_to_smallest"][largest] <= 1.2
            )
            for name, row in databases.items()
        },
    }
    publish(SCENARIO, result, _markdown(result), args.output, args.markdown)
    print(_markdown(result))


if __name__ == "__main__":
    main()
