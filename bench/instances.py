"""Instances: a reply followed from another instance, with Redis and without.

Two instances of the service, A and B (`chatbot serve`, one worker each, JWT on, limits out of
the way), on one PostgreSQL database, relaying to the fake upstream (`bench/harness/upstream.py`:
`--ttft-ms` before the first token, then `--tokens` tokens `--token-ms` apart). With Redis,
both use a redis-server of this scenario's own (REDIS_URL): the producer writes its deltas
there every CHATBOT_REDIS_FLUSH_MS and B reads them as they come. Without it, B follows a reply
produced on A from the database, at the pace of A's checkpoints (CHATBOT_CHECKPOINT_SECONDS).
Both settings pass through from this environment. Each mode has a pair of instances of its
own, on a database of its own; both pairs run side by side (an idle pair costs nothing).

- Lag: `--replies` replies one after the other (`--replies-without-redis` without Redis, where
  each takes a checkpoint to reach B): each turn is started on A in the background (202), then
  followed at once (GET /v1/messages/{id}/stream) by two clients, one on A (which follows it in
  memory) and one on B. For every token, the time it reached each follower (the arrival of the
  delta that completed it); lag = B's time minus A's: what following from another instance
  adds. Counted too: the deltas each follower got against the tokens sent (with Redis, B should
  get every token as a delta of its own, as A does).
- CPU per relayed token: `--concurrent` clients each start a turn on A and follow its reply to
  the end, then the next, `--warmup-seconds` unmeasured, then `--window-seconds` counted. With
  Redis the follower is on B; without, on A (one instance, the baseline: the producer's own
  followers read from memory). CPU seconds (user + system, from /proc) of A, of B and of
  redis-server over the window, per token that reached a follower in it. Both modes produce
  the same replies, so what differs is the cost of relaying them. `--rounds` rounds of each
  mode, the modes alternating in an order that rotates, so that what else the shared machine
  does falls on both alike; the report gives the median over rounds.

Both followers' arrivals are taken on one clock in this one client process, so the lag needs
no clock synchronisation; the client's own scheduling falls on both alike, the order of the
two requests alternating from reply to reply.

    python bench/instances.py                # the full scenario, about 2.5 minutes
    python bench/instances.py --replies 10 --replies-without-redis 4 --window-seconds 5

Writes its part of bench/results/latest.json (key "instances") and of latest.md.
Exits non-zero when a turn fails.
"""

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.clients import TurnError, run_client_loop, sse_events
from harness.processes import MachineLoad, cpu_seconds, is_alive, wait_quiet
from harness.report import fmt, machine_note, measured_at, met_lines, percentiles
from harness.scenario import comma_list, finish, rotated, run_scenario, scenario_parser
from harness.servers import RedisServer, Servers, benchmark_settings
from harness.targets import Slot, Target, make_slots, prepare_conversations
from harness.upstream import ReplyShape

from chatbot.config import Settings

SCENARIO = "instances"
MODEL = "bench-instances"
FIRST_TURN_SHAPE = ReplyShape("bench-sequential", 10, 200)
"""The short reply of the turn that titles each conversation before it is used."""
PRODUCER, OTHER = "ours-postgres-a", "ours-postgres-b"
WITH_REDIS, WITHOUT_REDIS = "redis", "no_redis"
LAG_CONVERSATIONS = 4
"""Conversations the lag's turns go round, so that each stays short."""
RELAY_CONVERSATIONS = 2
"""Per client: a turn never waits for its conversation to be freed by the previous one."""


# ---------------------------------------------------------------- one reply, one follower


@dataclass
class Followed:
    """What one follower saw of one reply: when each delta arrived, and the text."""

    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(arrival time, characters of the reply up to the end of the delta)."""
    text: str = ""

    def token_times(self, ends: list[int]) -> list[float]:
        """When each token (the one ending at character `ends[i]`) had reached this follower:
        the arrival of the delta that completed it; NaN for one that never came."""
        times: list[float] = []
        deltas = iter(self.arrivals)
        arrival, end = next(deltas, (math.nan, math.inf))
        for token_end in ends:
            while end < token_end:
                arrival, end = next(deltas, (math.nan, math.inf))
            times.append(arrival)
        return times

    def merged(self, ends: list[int]) -> list[str]:
        """The deltas that carried more than one token, each as `tokens i-j`: where a
        follower got tokens together that the upstream sent apart."""
        found, start = [], 0
        for _, end in self.arrivals:
            first, last = bisect.bisect_right(ends, start), bisect.bisect_right(ends, end) - 1
            if last > first:
                found.append(f"tokens {first}-{last}")
            start = end
        return found


async def _start_turn(producer: Target, slot: Slot) -> str:
    """A turn started on the producer in the background (202): its reply's id."""
    connection = slot.connection(f"{producer.name} turns", producer.port)
    path, body, headers = producer.request(slot, MODEL, background=True)
    await connection.open()
    status, payload = await connection.post_whole(path, body, headers)
    if status != 202:
        raise TurnError(f"{producer.name}: HTTP {status}: {payload[:300]!r}")
    return str(json.loads(payload)["assistant_message"]["id"])


async def _follow(target: Target, slot: Slot, reply_id: str) -> Followed:
    """The reply followed on `target` from its start to its `done`, each delta timed."""
    connection = slot.connection(target.name, target.port)
    headers = {"Authorization": f"Bearer {slot.token}", "Accept": "text/event-stream"}
    followed, buffer = Followed(), bytearray()
    ended: tuple[str, str] | None = None
    try:
        await connection.open()
        status = await connection.get(f"/v1/messages/{reply_id}/stream", headers)
        if status != 200:
            text = b"".join([chunk async for chunk in connection.body()])
            raise TurnError(f"{target.name}: HTTP {status}: {text[:300]!r}")
        async for chunk in connection.body():
            arrived = time.monotonic()
            buffer += chunk
            for name, data in sse_events(buffer):
                if name == "delta":
                    followed.text += json.loads(data)["content"]
                    followed.arrivals.append((arrived, len(followed.text)))
                elif name in ("done", "error"):
                    ended = (name, data)
    except BaseException:
        connection.close()
        raise
    if ended is None or ended[0] != "done":
        raise TurnError(f"{target.name}: the stream ended with {ended!r:.300}")
    return followed


def _token_ends(shape: ReplyShape) -> list[int]:
    """Where each of the reply's tokens ends, in characters of its text."""
    return list(itertools.accumulate(len(token) for token in shape.token_texts()))


# ---------------------------------------------------------------- lag


async def _lag(
    producer: Target,
    other: Target,
    slot: Slot,
    shape: ReplyShape,
    replies: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """`replies` replies one at a time, each followed on both instances at once."""
    ends, expected = _token_ends(shape), shape.text()
    timeout = 3 * shape.seconds(args.ttft_ms) + 2 * args.checkpoint_seconds + 30
    lags: list[float] = []
    first_token_lags: list[float] = []
    deltas = {producer.name: 0, other.name: 0}
    fewer = {producer.name: 0, other.name: 0}
    merged: list[str] = []
    errors: list[str] = []
    followed_replies = 0
    started, load = time.monotonic(), MachineLoad()
    for number in range(replies):
        followers = rotated([producer, other], number)
        try:
            async with asyncio.timeout(timeout):
                for target in followers:  # connected before the turn starts
                    await slot.connection(target.name, target.port).open()
                reply_id = await _start_turn(producer, slot)
                seen = await asyncio.gather(*(_follow(t, slot, reply_id) for t in followers))
        except Exception as exc:
            errors.append(repr(exc)[:300])
            await asyncio.sleep(0.5)  # an error should not turn into a tight loop
            continue
        followed_replies += 1
        by_name = {target.name: followed for target, followed in zip(followers, seen, strict=True)}
        for name, followed in by_name.items():
            deltas[name] += len(followed.arrivals)
            fewer[name] += len(followed.arrivals) < shape.tokens
            if together := followed.merged(ends):
                where = _role(producer, name).upper()
                merged.append(f"on {where}, {reply_id}: {', '.join(together)}")
            if followed.text != expected:
                errors.append(f"{name}: text {followed.text[:100]!r}... is not the reply's")
        here, there = (by_name[name].token_times(ends) for name in (producer.name, other.name))
        reply_lags = [1000 * (b - a) for a, b in zip(here, there, strict=True)]
        lags += reply_lags
        first_token_lags.append(reply_lags[0])
        await asyncio.sleep(0.05)  # let the turn's last writes land before the next one
    return {
        "replies": replies,
        "replies_followed": followed_replies,
        "tokens_sent": followed_replies * shape.tokens,
        "deltas": {_role(producer, name): count for name, count in deltas.items()},
        "replies_with_fewer_deltas_than_tokens": {
            _role(producer, name): count for name, count in fewer.items()
        },
        "merged_deltas_samples": merged[:5],
        "lag_ms": percentiles(lags, with_max=True),
        "first_token_lag_ms": percentiles(first_token_lags, with_max=True),
        "wall_s": round(time.monotonic() - started, 1),
        "machine": load.report(),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def _role(producer: Target, name: str) -> str:
    """`a` for the producer's instance, `b` for the other: how results name them."""
    return "a" if name == producer.name else "b"


# ---------------------------------------------------------------- CPU per relayed token


@dataclass
class Relay:
    """Many replies at once, each followed by one client: what reached the followers."""

    counted_from: float
    counted_to: float
    tokens: int = 0
    """Tokens that reached a follower in the window."""
    replies: int = 0
    """Replies followed to their end (any time in the round)."""
    deltas: int = 0
    """Deltas of those replies, against `replies` times the tokens of one."""
    fewer: int = 0
    """Replies that reached their follower in fewer deltas than tokens."""
    merged: list[str] = field(default_factory=list)
    """Which tokens of those replies came together, and the reply's id."""
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    machine: dict[str, float] = field(default_factory=dict)


async def _relay(
    pair: "Pair", redis_pid: int, shape: ReplyShape, args: argparse.Namespace
) -> dict[str, Any]:
    """One round: `--concurrent` clients, each starting turns on A and following them."""
    producer, follower, slots = pair.producer, pair.follower, pair.relay_slots
    ends, expected = _token_ends(shape), shape.text()
    reply_s = shape.seconds(args.ttft_ms)
    timeout = 3 * reply_s + 2 * args.checkpoint_seconds + 30
    started = time.monotonic()
    relay = Relay(
        started + args.warmup_seconds, started + args.warmup_seconds + args.window_seconds
    )

    async def client(slot: Slot) -> None:
        # Started one after the other over a reply's time: replies end at different moments.
        await asyncio.sleep(slot.index * reply_s / len(slots))
        while time.monotonic() < relay.counted_to:
            try:
                async with asyncio.timeout(timeout):
                    reply_id = await _start_turn(producer, slot)
                    followed = await _follow(follower, slot, reply_id)
            except Exception as exc:
                relay.errors.append(repr(exc)[:300])
                await asyncio.sleep(0.5)
                continue
            if followed.text != expected:
                relay.errors.append(f"text {followed.text[:100]!r}... is not the reply's")
            relay.replies += 1
            relay.deltas += len(followed.arrivals)
            relay.fewer += len(followed.arrivals) < shape.tokens
            if together := followed.merged(ends):
                relay.merged.append(f"{reply_id}: {', '.join(together)}")
            relay.tokens += sum(
                1
                for arrived in followed.token_times(ends)
                if relay.counted_from <= arrived < relay.counted_to
            )

    async def sample() -> None:
        await asyncio.sleep(max(0.0, relay.counted_from - time.monotonic()))
        before, load = _cpu(pair, redis_pid), MachineLoad()
        await asyncio.sleep(max(0.0, relay.counted_to - time.monotonic()))
        after = _cpu(pair, redis_pid)
        relay.cpu_s = {name: after[name] - before[name] for name in after}
        relay.machine = load.report()

    await asyncio.gather(sample(), *(client(slot) for slot in slots))
    cpu = relay.cpu_s | {"a_plus_b": relay.cpu_s["a"] + relay.cpu_s["b"]}
    cpu["all"] = cpu["a_plus_b"] + cpu["redis_server"]
    return {
        "replies_followed": relay.replies,
        "deltas": relay.deltas,
        "replies_with_fewer_deltas_than_tokens": relay.fewer,
        "merged_deltas": relay.merged,
        "tokens_relayed": relay.tokens,
        "cpu_us_per_token": {
            name: round(1e6 * seconds / relay.tokens, 1) if relay.tokens else None
            for name, seconds in cpu.items()
        },
        "cpu_cores": {
            name: round(seconds / args.window_seconds, 3) for name, seconds in cpu.items()
        },
        "machine": relay.machine,
        "errors": relay.errors,
    }


def _cpu(pair: "Pair", redis_pid: int) -> dict[str, float]:
    """CPU seconds the pair's instances (`a`, `b`) and the redis-server have used so far."""
    return {
        "a": cpu_seconds(pair.producer.pids()),
        "b": cpu_seconds(pair.other.pids()),
        "redis_server": cpu_seconds([redis_pid]),
    }


def _relay_summary(
    pair: "Pair", rounds: list[dict[str, Any]], shape: ReplyShape, args: argparse.Namespace
) -> dict[str, Any]:
    """A mode's rounds: the median of each figure over them, the rounds' own alongside."""
    replies = sum(row["replies_followed"] for row in rounds)
    errors = [error for row in rounds for error in row["errors"]]

    def median(key: str) -> dict[str, float | None]:
        names = rounds[0][key]
        return {
            name: round(statistics.median(found), 3 if key == "cpu_cores" else 1)
            if (found := [row[key][name] for row in rounds if row[key][name] is not None])
            else None
            for name in names
        }

    return {
        "concurrent_replies": len(pair.relay_slots),
        "followers_on": _role(pair.producer, pair.follower.name),
        "rounds": len(rounds),
        "window_s": args.window_seconds,
        "replies_followed": replies,
        "tokens_relayed": sum(row["tokens_relayed"] for row in rounds),
        "tokens_per_s": round(
            statistics.median(row["tokens_relayed"] for row in rounds) / args.window_seconds, 1
        ),
        "deltas_per_token": round(
            sum(row["deltas"] for row in rounds) / (replies * shape.tokens), 3
        )
        if replies
        else None,
        "replies_with_fewer_deltas_than_tokens": sum(
            row["replies_with_fewer_deltas_than_tokens"] for row in rounds
        ),
        "merged_deltas_samples": [each for row in rounds for each in row["merged_deltas"]][:5],
        "cpu_us_per_token": median("cpu_us_per_token"),
        "cpu_cores": median("cpu_cores"),
        "by_round": [
            {key: row[key] for key in ("tokens_relayed", "cpu_us_per_token", "machine")}
            for row in rounds
        ],
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def _ratios(modes: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """CPU per relayed token with Redis over without: the producer's, and everything's (B
    only follows with Redis, so it has no ratio of its own)."""
    if WITH_REDIS not in modes or WITHOUT_REDIS not in modes:
        return {}
    on, off = (modes[mode]["relay"]["cpu_us_per_token"] for mode in (WITH_REDIS, WITHOUT_REDIS))
    return {
        name: round(on[name] / off[name], 2) if on[name] and off[name] else None
        for name in ("a", "a_plus_b", "all")
    }


# ---------------------------------------------------------------- report


def _markdown(result: dict[str, Any]) -> str:
    upstream, modes, cores = result["upstream"], result["modes"], result["cores"]
    lines = [
        "### Instances: following a reply from another instance",
        "",
        f"Two instances of the service, A and B, on one PostgreSQL database; fake upstream: "
        f"{upstream['ttft_ms']:g} ms to the first token, then {upstream['tokens']} tokens "
        f"{upstream['token_ms']:g} ms apart. With Redis, both share one redis-server and the "
        f"producer writes its deltas there every {result['redis_flush_ms']:g} ms "
        "(CHATBOT_REDIS_FLUSH_MS); without, B reads a reply running on A from the database, "
        f"which A checkpoints every {result['checkpoint_seconds']:g} s "
        "(CHATBOT_CHECKPOINT_SECONDS).",
        "",
        "**Lag.** One reply at a time, started on A in the background and followed at once by "
        "a client on A and one on B; lag = when a token reached B minus when it reached A "
        "(one clock, the client's).",
        "",
        "| Redis | replies | tokens sent | deltas on A | deltas on B | lag p50 | lag p95 "
        "| lag max | first token lag p50 | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, row in modes.items():
        lag = row["lag"]
        lines.append(
            f"| {_mode_name(mode)} | {lag['replies_followed']} | {lag['tokens_sent']:,} "
            f"| {lag['deltas']['a']:,} | {lag['deltas']['b']:,} | {fmt(lag['lag_ms']['p50'])} "
            f"| {fmt(lag['lag_ms']['p95'])} | {fmt(lag['lag_ms']['max'])} "
            f"| {fmt(lag['first_token_lag_ms']['p50'])} | {lag['errors']} |"
        )
    relays = [row["relay"] for row in modes.values()]
    lines += [
        "",
        f"**CPU per relayed token.** {relays[0]['concurrent_replies']} replies at once, each "
        "started on A and followed to its end by one client, on B with Redis, on A without "
        "(one instance: the baseline); CPU (user + system) of each process over a "
        f"{relays[0]['window_s']:g} s window, per token that reached a follower in it; median "
        f"of {relays[0]['rounds']} rounds of each mode, the modes alternating.",
        "",
        "| Redis | followers on | tokens relayed | deltas / token | A (producer) | B "
        "| A + B | redis-server | A + B + redis | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, row in modes.items():
        relay = row["relay"]
        cpu = relay["cpu_us_per_token"]
        lines.append(
            f"| {_mode_name(mode)} | {relay['followers_on'].upper()} "
            f"| {relay['tokens_relayed']:,} ({relay['tokens_per_s']:,.0f}/s) "
            f"| {relay['deltas_per_token']} | {fmt(cpu['a'], ' µs')} | {fmt(cpu['b'], ' µs')} "
            f"| {fmt(cpu['a_plus_b'], ' µs')} | {fmt(cpu['redis_server'], ' µs')} "
            f"| {fmt(cpu['all'], ' µs')} | {relay['errors']} |"
        )
    ratios = result["ratio_redis_to_none"]
    if ratios:
        lines.append(
            f"| with / without | | | | {_times(ratios['a'])} | - | {_times(ratios['a_plus_b'])}"
            f" | | {_times(ratios['all'])} | |"
        )
    for mode, row in modes.items():
        lag, relay = row["lag"], row["relay"]
        if samples := lag["merged_deltas_samples"] + relay["merged_deltas_samples"]:
            in_lag = sum(lag["replies_with_fewer_deltas_than_tokens"].values())
            lines += [
                "",
                f"{_mode_name(mode).capitalize()} Redis, replies whose follower got some tokens "
                f"together in one delta: {in_lag} of {lag['replies_followed']} (lag), "
                f"{relay['replies_with_fewer_deltas_than_tokens']} of {relay['replies_followed']}"
                f" (CPU); for instance {'; '.join(samples[:3])}.",
            ]
    lines += ["", "Machine (the noise around these figures):"]
    for mode, row in modes.items():
        lines.append(f"- {_mode_name(mode)}, lag: {machine_note(row['lag']['machine'], cores)}")
        notes = [machine_note(each["machine"], cores) for each in row["relay"]["by_round"]]
        lines.append(f"- {_mode_name(mode)}, CPU rounds: {'; '.join(notes)}")
    lines += ["", *met_lines(result["targets_met"])]
    return "\n".join(lines) + "\n"


def _mode_name(mode: str) -> str:
    return "with" if mode == WITH_REDIS else "without"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _targets_met(modes: dict[str, dict[str, Any]]) -> dict[str, bool]:
    met: dict[str, bool] = {}
    if (row := modes.get(WITH_REDIS)) is not None:
        lag, relay = row["lag"], row["relay"]
        met["with Redis, B got every token as a delta of its own"] = (
            lag["deltas"]["b"] == lag["tokens_sent"]
            and not lag["replies_with_fewer_deltas_than_tokens"]["b"]
            and not relay["replies_with_fewer_deltas_than_tokens"]
        )
    return met


# ---------------------------------------------------------------- main


@dataclass
class Pair:
    """A mode's two instances, A (the producer) and B, on a database of their own, and the
    clients that talk to them (users of that pair's JWT secret)."""

    mode: str
    producer: Target
    other: Target
    lag_slot: Slot
    relay_slots: list[Slot]

    @property
    def follower(self) -> Target:
        """Where the relay's clients follow: B with Redis, A without (one instance)."""
        return self.other if self.mode == WITH_REDIS else self.producer

    def pids(self) -> list[int]:
        return [self.producer.pid, self.other.pid]

    def close(self) -> None:
        for slot in (self.lag_slot, *self.relay_slots):
            slot.close()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shape = ReplyShape(MODEL, args.tokens, 1000 / args.token_ms)
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(workdir))
        # Both modes' pairs run side by side, so that their rounds can alternate: what else
        # the shared machine does then falls on both alike (an idle pair costs nothing).
        pairs: list[Pair] = []
        every_servers: list[Servers] = []
        for mode in args.modes:
            modedir = workdir / mode
            modedir.mkdir()
            settings = benchmark_settings(MODEL)
            if mode == WITH_REDIS:
                settings["REDIS_URL"] = redis.url
            servers = stack.enter_context(
                Servers(
                    modedir,
                    [PRODUCER, OTHER],
                    [shape, FIRST_TURN_SHAPE],
                    args.ttft_ms,
                    args.database_url,
                    f"{args.pg_database}_{mode}",
                    service_settings=settings,
                    shared_database=True,
                )
            )
            every_servers.append(servers)
            secret = servers.jwt_secret
            pairs.append(
                Pair(
                    mode,
                    Target(servers.servers[PRODUCER]),
                    Target(servers.servers[OTHER]),
                    make_slots(1, secret, "lag")[0],
                    make_slots(args.concurrent, secret, "relay"),
                )
            )
        print(f"measuring {', '.join(args.modes)}; logs in {workdir}", flush=True)
        modes = run_client_loop(_measure(args, pairs, redis.pid, shape))
        for servers in every_servers:
            servers.check_alive()
        if not is_alive(redis.pid):
            raise RuntimeError("redis-server exited during the run")
    return {
        "measured_at": measured_at(),
        "cores": os.cpu_count(),
        "upstream": {"ttft_ms": args.ttft_ms, "tokens": args.tokens, "token_ms": args.token_ms},
        "redis_flush_ms": _setting("redis_flush_ms"),
        "checkpoint_seconds": args.checkpoint_seconds,
        "modes": modes,
        "ratio_redis_to_none": _ratios(modes),
        "targets_met": _targets_met(modes),
    }


def _setting(name: str) -> float:
    """A setting of the services as this environment sets it (it passes through), else its
    default."""
    value = os.environ.get(f"CHATBOT_{name.upper()}")
    return float(value) if value else float(Settings.model_fields[name].default)


async def _measure(
    args: argparse.Namespace, pairs: list[Pair], redis_pid: int, shape: ReplyShape
) -> dict[str, dict[str, Any]]:
    every_pid = [pid for pair in pairs for pid in pair.pids()]
    try:
        for pair in pairs:
            # Conversations live in the shared database: made on A, B reaches them too.
            await prepare_conversations(
                [pair.producer], [pair.lag_slot], MODEL, LAG_CONVERSATIONS, FIRST_TURN_SHAPE.model
            )
            await prepare_conversations(
                [pair.producer],
                pair.relay_slots,
                MODEL,
                RELAY_CONVERSATIONS,
                FIRST_TURN_SHAPE.model,
            )
        lags: dict[str, dict[str, Any]] = {}
        for pair in pairs:
            await wait_quiet(every_pid)  # the titles are written after the first turns
            replies = args.replies if pair.mode == WITH_REDIS else args.replies_without_redis
            print(f"{_mode_name(pair.mode)} Redis, lag: {replies} replies", flush=True)
            lags[pair.mode] = await _lag(
                pair.producer, pair.other, pair.lag_slot, shape, replies, args
            )
            _progress_lag(lags[pair.mode])
        rounds: dict[str, list[dict[str, Any]]] = {pair.mode: [] for pair in pairs}
        for number in range(args.rounds):
            for pair in rotated(pairs, number):
                await wait_quiet(every_pid)
                row = await _relay(pair, redis_pid, shape, args)
                rounds[pair.mode].append(row)
                _progress_relay(pair, number, row)
    finally:
        for pair in pairs:
            pair.close()
    return {
        pair.mode: {
            "lag": lags[pair.mode],
            "relay": _relay_summary(pair, rounds[pair.mode], shape, args),
        }
        for pair in pairs
    }


def _progress_lag(lag: dict[str, Any]) -> None:
    print(
        f"  lag B-A p50/p95/max {fmt(lag['lag_ms']['p50'])} / {fmt(lag['lag_ms']['p95'])} / "
        f"{fmt(lag['lag_ms']['max'])}; deltas A {lag['deltas']['a']}, B {lag['deltas']['b']} "
        f"of {lag['tokens_sent']} tokens; {lag['errors']} errors ({lag['wall_s']:g} s; "
        f"{machine_note(lag['machine'], os.cpu_count())})",
        flush=True,
    )


def _progress_relay(pair: Pair, number: int, row: dict[str, Any]) -> None:
    cpu = row["cpu_us_per_token"]
    print(
        f"  round {number + 1} {_mode_name(pair.mode)} Redis, followers on "
        f"{_role(pair.producer, pair.follower.name).upper()}: {row['tokens_relayed']} tokens; "
        f"A {fmt(cpu['a'], ' µs')}, B {fmt(cpu['b'], ' µs')}, redis "
        f"{fmt(cpu['redis_server'], ' µs')} a token; {len(row['errors'])} errors "
        f"({machine_note(row['machine'], os.cpu_count())})",
        flush=True,
    )


def main() -> None:
    parser = scenario_parser(__doc__, "chatbot_bench_instances", None)
    parser.add_argument("--ttft-ms", type=float, default=50, help="the upstream's wait")
    parser.add_argument("--tokens", type=int, default=50, help="tokens of every reply")
    parser.add_argument("--token-ms", type=float, default=20, help="the upstream's pace")
    parser.add_argument("--replies", type=int, default=30, help="lag: replies with Redis")
    parser.add_argument(
        "--replies-without-redis",
        type=int,
        default=15,
        help="lag: replies without Redis (each takes a checkpoint to reach B)",
    )
    parser.add_argument("--concurrent", type=int, default=20, help="CPU: replies at once")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: rounds of each mode")
    parser.add_argument("--warmup-seconds", type=float, default=2)
    parser.add_argument("--window-seconds", type=float, default=6)
    parser.add_argument(
        "--modes",
        type=comma_list(str),
        default=[WITH_REDIS, WITHOUT_REDIS],
        help=f"which of {WITH_REDIS}, {WITHOUT_REDIS}",
    )
    args = parser.parse_args()
    args.checkpoint_seconds = _setting("checkpoint_seconds")

    result, workdir = run_scenario(SCENARIO, "instances", args, run, _markdown)
    errors = sum(row[phase]["errors"] for row in result["modes"].values() for phase in row)
    finish(workdir, args.keep, f"{errors} turns failed" if errors else None)


if __name__ == "__main__":
    main()
