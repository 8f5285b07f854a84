"""Load test: many concurrent streaming conversations, then a row-by-row check of the database.

Three processes: the fake OpenAI-compatible upstream (`bench/harness/upstream.py`, each reply
`--tokens` tokens at `--tokens-per-second`), the service (`chatbot serve`, default limits, one
user per conversation signed with the service's JWT secret) and this one, the load generator.
Each of `--streams` workers creates a conversation, then sends messages with unique texts one
after the other, reading every reply to its end over SSE on a real socket and checking it word
for word, for `--duration` seconds after a ramp. When the last reply is in, the database is read
directly and every message the workers sent must be there exactly once, every reply complete.

    python bench/loadtest.py --streams 300 --duration 60 --database sqlite
    python bench/loadtest.py --database postgresql://postgres@127.0.0.1:5432/postgres

Exits non-zero on any error, any lost message, or when the concurrency target is not reached.
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness.clients import RawStream, sse_events, user_token
from harness.databases import SQLITE, database_kind
from harness.processes import cpu_seconds, status_kib
from harness.report import percentiles, write_json
from harness.scenario import finish, script_parser
from harness.servers import DIRECT, Servers
from harness.upstream import ReplyShape
from sqlalchemy import select

from chatbot.conversations.models import Conversation
from chatbot.db import create_engine
from chatbot.messages.models import Message, MessageStatus, Role

REPLY_MODEL = "fake-model"
"""The name the upstream gives its replies: the service asks for its default model, which the
upstream answers with its only shape."""

# A new log record: the service's own format starts with the date, uvicorn's with the level.
_LOG_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d |[A-Z]+:\s)")
_ERROR_RECORD = re.compile(r"^(\S+ \S+ (ERROR|CRITICAL) |(ERROR|CRITICAL):\s)")


@dataclass
class TurnRecord:
    worker: int
    conversation_id: str
    content: str
    user_message_id: str | None = None
    assistant_message_id: str | None = None
    ttft_ms: float | None = None
    turn_ms: float | None = None
    ok: bool = False


@dataclass
class LoadState:
    expected_reply: str
    stop_at: float
    turn_timeout: float = 120
    conversations: dict[str, str] = field(default_factory=dict)
    """Conversation id -> the user who owns it."""
    turns: list[TurnRecord] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    """Turns sent and not yet answered to the end, whether or not the stream has opened."""
    peak_in_flight: int = 0
    open_streams: int = 0
    """Streams the service accepted (200 and headers received) and not yet ended."""
    peak_open_streams: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    service_cpu: list[tuple[float, float]] = field(default_factory=list)
    """(time, share of one core the service used over the second before it)."""

    def error(self, kind: str, worker: int, detail: str, **extra: Any) -> None:
        self.errors.append({"kind": kind, "worker": worker, "detail": detail[:500], **extra})


# ---------------------------------------------------------------- database


async def _settled(database_url: str, timeout_seconds: float) -> bool:
    """Wait until no reply is running and no conversation is claimed."""
    engine = create_engine(database_url)
    try:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            async with engine.connect() as connection:
                running = await connection.scalar(
                    select(Message.id).where(Message.status == MessageStatus.IN_PROGRESS).limit(1)
                )
                claimed = await connection.scalar(
                    select(Conversation.id)
                    .where(Conversation.active_reply_id.is_not(None))
                    .limit(1)
                )
            if running is None and claimed is None:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await engine.dispose()


async def _check_database(database_url: str, state: LoadState, reply_tokens: int) -> dict[str, Any]:
    """Every message the workers sent, row by row; returns lost messages and other mismatches."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            message_rows = (await connection.execute(select(Message.__table__))).mappings().all()
            conversation_rows = (
                (await connection.execute(select(Conversation.__table__))).mappings().all()
            )
    finally:
        await engine.dispose()
    lost: list[str] = []
    mismatches: list[str] = []
    by_id = {str(row["id"]): row for row in message_rows}
    accepted = [turn for turn in state.turns if turn.user_message_id is not None]
    for turn in accepted:
        user = by_id.get(str(turn.user_message_id))
        reply = by_id.get(str(turn.assistant_message_id))
        where = f"conversation {turn.conversation_id}, message {turn.content!r}"
        if user is None:
            lost.append(f"user message missing: {where}")
        elif (
            str(user["conversation_id"]) != turn.conversation_id
            or user["role"] != Role.USER
            or user["content"] != turn.content
            or user["status"] != MessageStatus.COMPLETED
        ):
            lost.append(f"user message altered: {where}: {user['content']!r} {user['status']}")
        if reply is None:
            lost.append(f"reply missing: {where}")
            continue
        if reply["status"] != MessageStatus.COMPLETED or reply["content"] != state.expected_reply:
            lost.append(
                f"reply not complete: {where}: status {reply['status']}, "
                f"{len(reply['content'])}/{len(state.expected_reply)} characters"
            )
        elif (
            str(reply["conversation_id"]) != turn.conversation_id
            or reply["role"] != Role.ASSISTANT
            or user is None
            or reply["seq"] != user["seq"] + 1
            or reply["finish_reason"] != "stop"
            or reply["completion_tokens"] != reply_tokens
        ):
            mismatches.append(
                f"reply fields: {where}: seq {reply['seq']}, finish {reply['finish_reason']}, "
                f"completion_tokens {reply['completion_tokens']}"
            )
    known = {str(turn.user_message_id) for turn in accepted} | {
        str(turn.assistant_message_id) for turn in accepted
    }
    for row in message_rows:
        if str(row["id"]) not in known:
            mismatches.append(f"row the client never saw: {row['role']} {row['content'][:60]!r}")
        if row["status"] == MessageStatus.IN_PROGRESS:
            mismatches.append(f"reply left in progress: {row['id']}")
    texts = Counter(row["content"] for row in message_rows if row["role"] == Role.USER)
    mismatches += [f"sent {count} times: {text!r}" for text, count in texts.items() if count > 1]
    turns_per_conversation = Counter(turn.conversation_id for turn in accepted)
    seqs: dict[str, list[int]] = {}
    for row in message_rows:
        seqs.setdefault(str(row["conversation_id"]), []).append(row["seq"])
    conversation_ids = {str(row["id"]) for row in conversation_rows}
    if conversation_ids != set(state.conversations):
        mismatches.append(
            f"conversations: {len(conversation_ids)} in the database, "
            f"{len(state.conversations)} created by the client"
        )
    for row in conversation_rows:
        conversation_id = str(row["id"])
        expected = 2 * turns_per_conversation[conversation_id]
        if row["user_id"] != state.conversations.get(conversation_id):
            mismatches.append(f"conversation {conversation_id} owned by {row['user_id']}")
        if row["message_count"] != expected or row["active_reply_id"] is not None:
            mismatches.append(
                f"conversation {conversation_id}: message_count {row['message_count']} "
                f"(expected {expected}), active_reply_id {row['active_reply_id']}"
            )
        if sorted(seqs.get(conversation_id, [])) != list(range(1, expected + 1)):
            mismatches.append(f"conversation {conversation_id}: positions are not 1..{expected}")
    roles = Counter(row["role"] for row in message_rows)
    return {
        "lost": lost,
        "mismatches": mismatches,
        "rows": {
            "conversations": len(conversation_rows),
            "user_messages": roles[Role.USER],
            "assistant_messages": roles[Role.ASSISTANT],
            "titled_conversations": sum(1 for row in conversation_rows if row["title"]),
        },
    }


# ---------------------------------------------------------------- load


async def _turn(
    client: RawStream, state: LoadState, worker: int, token: str, turn: TurnRecord
) -> None:
    started = time.perf_counter()
    text: list[str] = []
    final: tuple[str, dict[str, Any]] | None = None
    status = await client.post(
        f"/v1/conversations/{turn.conversation_id}/messages",
        json.dumps({"content": turn.content}).encode(),
        {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
    )
    if status != 200:
        body = b"".join([chunk async for chunk in client.body()]).decode(errors="replace")
        state.error("http_status", worker, body, status=status)
        return
    state.open_streams += 1
    state.peak_open_streams = max(state.peak_open_streams, state.open_streams)
    try:
        buffer = bytearray()
        async for chunk in client.body():
            buffer += chunk
            for name, data in sse_events(buffer):
                payload = json.loads(data)
                if name == "start":
                    turn.user_message_id = payload["user_message"]["id"]
                    turn.assistant_message_id = payload["assistant_message"]["id"]
                elif name == "delta":
                    if turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - started) * 1000
                    text.append(payload["content"])
                elif name in ("done", "error"):
                    final = (name, payload)
    finally:
        state.open_streams -= 1
    turn.turn_ms = (time.perf_counter() - started) * 1000
    streamed = "".join(text)
    if final is None:
        state.error("no_final_event", worker, f"stream ended after {len(streamed)} characters")
    elif final[0] == "error":
        state.error("error_event", worker, json.dumps(final[1]))
    elif turn.user_message_id is None:
        state.error("no_start_event", worker, "stream without a start event")
    elif streamed != state.expected_reply:
        state.error("wrong_text", worker, f"streamed {streamed!r}")
    elif (
        final[1]["assistant_message"]["content"] != state.expected_reply
        or final[1]["assistant_message"]["status"] != MessageStatus.COMPLETED
    ):
        state.error("wrong_done", worker, json.dumps(final[1]))
    else:
        turn.ok = True


async def _worker(
    client: httpx.AsyncClient, state: LoadState, worker: int, token: str, delay: float
) -> None:
    url = httpx.URL(str(client.base_url))
    stream = RawStream(url.host, url.port or 80)
    try:
        await _work(client, stream, state, worker, token, delay)
    finally:
        stream.close()


async def _work(
    client: httpx.AsyncClient,
    stream: RawStream,
    state: LoadState,
    worker: int,
    token: str,
    delay: float,
) -> None:
    await asyncio.sleep(delay)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        response = await client.post("/v1/conversations", json={}, headers=headers)
    except httpx.HTTPError as exc:
        state.error("exception", worker, f"create conversation: {exc!r}")
        return
    if response.status_code != 201:
        state.error("http_status", worker, response.text, status=response.status_code)
        return
    conversation_id = response.json()["id"]
    state.conversations[conversation_id] = f"loadtest-user-{worker}"
    number = 0
    while time.monotonic() < state.stop_at:
        number += 1
        content = f"worker {worker} turn {number} {uuid.uuid4().hex}"
        turn = TurnRecord(worker, conversation_id, content)
        state.turns.append(turn)
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
        try:
            async with asyncio.timeout(state.turn_timeout):
                await _turn(stream, state, worker, token, turn)
        except Exception as exc:
            stream.close()  # whatever state the connection was left in, start afresh
            state.error("exception", worker, repr(exc))
        finally:
            state.in_flight -= 1
        if not turn.ok:
            await asyncio.sleep(1)  # an error should not turn into a tight loop


async def _sample(state: LoadState, service_pid: int) -> None:
    last_at, last_cpu = time.monotonic(), cpu_seconds([service_pid])
    while True:
        now = time.monotonic()
        state.samples.append((now, state.open_streams))
        if now - last_at >= 1:
            cpu = cpu_seconds([service_pid])
            state.service_cpu.append((now, (cpu - last_cpu) / (now - last_at)))
            last_at, last_cpu = now, cpu
        await asyncio.sleep(0.1)


async def _load(
    args: argparse.Namespace, base_url: str, secret: str, state: LoadState, service_pid: int
) -> None:
    lifetime = args.ramp_seconds + args.duration + 3600
    tokens = [
        user_token(secret, f"loadtest-user-{worker}", lifetime) for worker in range(args.streams)
    ]
    timeout = httpx.Timeout(args.turn_timeout, connect=30, pool=None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.streams)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        sampler = asyncio.create_task(_sample(state, service_pid))
        step = args.ramp_seconds / args.streams
        await asyncio.gather(
            *(
                _worker(client, state, worker, token, worker * step)
                for worker, token in enumerate(tokens)
            )
        )
        sampler.cancel()


# ---------------------------------------------------------------- report


def _service_log_errors(log_path: Path) -> list[str]:
    """Blocks of the service log at ERROR or CRITICAL, each with its traceback."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in log_path.read_text(errors="replace").splitlines():
        if _LOG_RECORD.match(line):
            if current is not None:
                blocks.append("\n".join(current))
            current = [line] if _ERROR_RECORD.match(line) else None
        elif current is not None or line.startswith("Traceback"):
            current = [*(current or []), line]
    if current is not None:
        blocks.append("\n".join(current))
    return blocks


def _summary(
    args: argparse.Namespace,
    state: LoadState,
    check: dict[str, Any],
    load_seconds: float,
    resources: dict[str, Any],
    service_errors: list[str],
) -> dict[str, Any]:
    completed = [turn for turn in state.turns if turn.ok]
    hold_start = state.stop_at - args.duration
    held = [count for at, count in state.samples if hold_start <= at <= state.stop_at]
    busy = [share for at, share in state.service_cpu if hold_start <= at <= state.stop_at]
    return {
        "database": database_kind(args.database),
        "streams": args.streams,
        "duration_s": args.duration,
        "ramp_s": args.ramp_seconds,
        "reply_tokens": args.tokens,
        "tokens_per_second": args.tokens_per_second,
        "load_wall_s": round(load_seconds, 1),
        "conversations": len(state.conversations),
        "turns_sent": len(state.turns),
        "turns_completed": len(completed),
        "turns_per_s": round(len(completed) / load_seconds, 1),
        "streamed_tokens_per_s": round(len(completed) * args.tokens / load_seconds, 1),
        "errors": len(state.errors),
        "error_kinds": dict(Counter(error["kind"] for error in state.errors)),
        "error_samples": state.errors[:5],
        "lost_messages": len(check["lost"]),
        "db_mismatches": len(check["mismatches"]),
        "db_rows": check["rows"],
        "service_log_errors": len(service_errors),
        "ttft_ms": percentiles([t.ttft_ms for t in completed if t.ttft_ms is not None], 1, True),
        "turn_ms": percentiles([t.turn_ms for t in completed if t.turn_ms is not None], 1, True),
        "peak_in_flight_turns": state.peak_in_flight,
        "peak_open_streams": state.peak_open_streams,
        "open_streams_during_hold": {
            "min": min(held, default=0),
            "mean": round(statistics.fmean(held), 1) if held else 0,
        },
        "service_cpu_pct_of_one_core_during_hold": {
            "mean": round(100 * statistics.fmean(busy)) if busy else None,
            "max": round(100 * max(busy)) if busy else None,
        },
        **resources,
    }


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    name = "ours-sqlite" if args.database == SQLITE else "ours-postgres"
    shape = ReplyShape(REPLY_MODEL, args.tokens, args.tokens_per_second)
    with Servers(
        workdir,
        [name],
        [shape],
        0,
        args.database,
        args.pg_database,
        service_settings={},  # the service's own limits: this is how it runs in production
        log_level=args.log_level,
        service_profile=args.profile_service,
    ) as servers:
        service, upstream = servers.servers[name], servers.servers[DIRECT]
        database_url = servers.database_urls[name]
        base_url = f"http://127.0.0.1:{service.port}"
        print(
            f"load: {args.streams} streams for {args.duration:g} s (ramp {args.ramp_seconds:g} s)"
            f" on {database_url.split(':', 1)[0]}; logs in {workdir}",
            flush=True,
        )
        started = time.monotonic()
        state = LoadState(
            shape.text(),
            stop_at=started + args.ramp_seconds + args.duration,
            turn_timeout=args.turn_timeout,
        )
        cpu_before = cpu_seconds([service.pid]), cpu_seconds([upstream.pid]), time.process_time()
        asyncio.run(_load(args, base_url, servers.jwt_secret, state, service.pid))
        load_seconds = time.monotonic() - started
        cpu_after = cpu_seconds([service.pid]), cpu_seconds([upstream.pid]), time.process_time()
        settled = asyncio.run(_settled(database_url, args.settle_timeout))
        if not settled:
            state.error("not_settled", -1, "replies still in progress after the load stopped")
        time.sleep(1)  # let the last chores (titles, summaries) land
        peak_rss_kb = status_kib(service.pid, "VmHWM")
        if (exit_code := servers.exit_code(name)) is not None:
            state.error("service_died", -1, f"exit code {exit_code}")
        check = asyncio.run(_check_database(database_url, state, args.tokens))
    cpu = [round(after - before, 1) for before, after in zip(cpu_before, cpu_after, strict=True)]
    resources = {
        "service_peak_rss_mb": round(peak_rss_kb / 1024, 1) if peak_rss_kb else None,
        "cpu_s": {"service": cpu[0], "fake_upstream": cpu[1], "load_generator": cpu[2]},
        "cores": os.cpu_count(),
    }
    service_errors = _service_log_errors(servers.log_path(name))
    result = _summary(args, state, check, load_seconds, resources, service_errors)
    problems = [
        *(f"error: {json.dumps(error)}" for error in state.errors),
        *(f"lost: {line}" for line in check["lost"]),
        *(f"database: {line}" for line in check["mismatches"]),
        *(f"service log:\n{block}" for block in service_errors),
    ]
    if state.peak_open_streams < args.streams:
        problems.append(f"peak open streams {state.peak_open_streams} < target {args.streams}")
    return result, problems


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--streams", type=int, default=500, help="concurrent conversations")
    parser.add_argument("--duration", type=float, default=60, help="seconds at full load")
    parser.add_argument("--ramp-seconds", type=float, default=20, help="to start every worker")
    parser.add_argument("--database", default="sqlite", help="'sqlite' or a PostgreSQL URL")
    parser.add_argument(
        "--pg-database", default="loadtest", help="database dropped and created on that server"
    )
    parser.add_argument("--tokens", type=int, default=100, help="tokens in each reply")
    parser.add_argument("--tokens-per-second", type=float, default=5, help="pace of each reply")
    parser.add_argument("--turn-timeout", type=float, default=120, help="read timeout, seconds")
    parser.add_argument("--settle-timeout", type=float, default=60)
    parser.add_argument("--log-level", default="WARNING", help="the service's log level")
    parser.add_argument("--output", type=Path, help="write the JSON result here")
    parser.add_argument(
        "--profile-service", type=Path, help="run the service under cProfile, stats to this file"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and SQLite file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatbot-loadtest-"))
    result, problems = run(args, workdir)
    print(json.dumps(result, indent=2))
    if args.output:
        write_json(args.output, result)
    if problems:
        (workdir / "problems.txt").write_text("\n".join(problems) + "\n")
        for line in problems[:20]:
            print(line, file=sys.stderr)
        more = f" ({len(problems) - 20} more)" if len(problems) > 20 else ""
        finish(workdir, args.keep, f"{len(problems)} problems{more}")
    print(
        f"OK: {result['turns_completed']} turns, {result['errors']} errors, "
        f"{result['lost_messages']} lost, peak {result['peak_open_streams']} open streams"
    )
    finish(workdir, args.keep)


if __name__ == "__main__":
    main()
