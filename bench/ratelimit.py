"""The request rate limiter's CPU per request as the number of active users grows.

The service's in-memory limiter (fixed windows in two generations, `quotas.service`) beside the
`limits` package's in-memory moving window it replaced, in one process, one after the other,
each request from the next of N users in turn, paced as a server's requests arrive (the old
storage's expiry sweep runs between them, over every key), through `admit` (what every
authenticated request awaits). CPU time is `time.process_time`: this process's own, so another
process on the machine does not count. The target: at most 20 us a request at 1,000 users, and
no growth with the users.

    .venv/bin/python bench/ratelimit.py
"""

import asyncio
import statistics
import time
from typing import Any

from harness.report import measured_at, met_lines, publish
from harness.scenario import add_result_options, script_parser
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from chatbot.config import Settings
from chatbot.quotas.service import RequestRateLimiter

SCENARIO = "rate_limiter"
LIMIT = "120/minute"
TARGET_US = 20.0
PER_USER = 100
"""Requests a user makes in a run: under the limit, so that every one is admitted."""


class NoLimit:
    """The paced loop alone: its cost is taken off the others'."""

    async def admit(self, user_id: str) -> None:
        return None


class LimitsMovingWindow:
    """What the service ran before: `limits`' moving window in its async memory storage."""

    def __init__(self) -> None:
        self._item = parse(LIMIT)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def admit(self, user_id: str) -> None:
        await self._limiter.hit(self._item, "requests", user_id)


async def _cpu_per_request(limiter: Any, users: int, requests: int, rate: float) -> float:
    """Microseconds of CPU per `admit`, at `rate` requests a second (a server's requests
    arrive spread in time, and a limiter's background work runs in between), each from the
    next of `users` users in turn, each under the limit; every user's first request (the
    window's opening) is left out."""
    requests = min(requests, users * PER_USER)
    names = [f"user-{index}" for index in range(users)]
    for name in names:
        await limiter.admit(name)
    loop = asyncio.get_running_loop()
    started, start = time.process_time(), loop.time()
    for index in range(requests):
        await limiter.admit(names[index % users])
        # Paced: the next request at its time, the loop free (for any sweep) until then.
        await asyncio.sleep(max(0.0, start + (index + 1) / rate - loop.time()))
    return (time.process_time() - started) / requests * 1e6


async def _cpu_back_to_back(limiter: Any, users: int, requests: int) -> float:
    """The same, requests back to back: a limiter with no background work shows its own cost
    this way, under the paced loop's noise."""
    requests = min(requests, users * PER_USER)
    names = [f"user-{index}" for index in range(users)]
    for name in names:
        await limiter.admit(name)
    started = time.process_time()
    for index in range(requests):
        await limiter.admit(names[index % users])
    return (time.process_time() - started) / requests * 1e6


async def run(
    sizes: list[int], requests: int, rate: float, rounds: int
) -> dict[str, dict[str, float]]:
    settings = Settings(_env_file=None, rate_limit=LIMIT, redis_url=None)
    figures: dict[str, dict[str, float]] = {"service": {}, "limits_moving_window": {}}
    figures["service_back_to_back"] = {}
    for users in sizes:
        samples: dict[str, list[float]] = {"service": [], "limits_moving_window": []}
        for _ in range(rounds):  # interleaved, so that noise falls on all three alike
            loop_alone = await _cpu_per_request(NoLimit(), users, requests, rate)
            ours = RequestRateLimiter(settings)
            samples["service"].append(
                await _cpu_per_request(ours, users, requests, rate) - loop_alone
            )
            await ours.aclose()
            samples["limits_moving_window"].append(
                await _cpu_per_request(LimitsMovingWindow(), users, requests, rate) - loop_alone
            )
        for name, values in samples.items():
            figures[name][str(users)] = round(max(0.0, statistics.median(values)), 2)
        ours = RequestRateLimiter(settings)
        figures["service_back_to_back"][str(users)] = round(
            await _cpu_back_to_back(ours, users, requests), 2
        )
        print(
            f"{users:>6} users: {figures['service'][str(users)]:8.2f} us (service), "
            f"{figures['limits_moving_window'][str(users)]:8.2f} us (limits moving window)",
            flush=True,
        )
    return figures


def _markdown(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    lines = [
        f"Request rate limiter, CPU per request ({LIMIT}; up to {result['requests']:,} "
        f"requests at {result['rate']:g} a second, at most {PER_USER} a user, the users in "
        "turn; one process, the paced loop's own cost measured alone and taken off; medians of "
        f"{result['rounds']} interleaved rounds):",
        "",
        "| active users | " + " | ".join(f"{size:,}" for size in sizes) + " |",
        "| --- |" + " --- |" * len(sizes),
    ]
    for name, label in (
        ("service", "this service (fixed windows in memory)"),
        ("service_back_to_back", "this service, requests back to back"),
        ("limits_moving_window", "`limits` moving window in memory (before)"),
    ):
        row = result["cpu_us_per_request"][name]
        lines.append(f"| {label} | " + " | ".join(f"{row[str(size)]} us" for size in sizes) + " |")
    lines += ["", *met_lines(result["targets_met"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--requests", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=500.0, help="requests a second")
    add_result_options(parser)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    figures = asyncio.run(run(sizes, args.requests, args.rate, args.rounds))
    ours = figures["service"]
    largest = str(sizes[-1])
    result = {
        "measured_at": measured_at(),
        "sizes": sizes,
        "requests": args.requests,
        "rate": args.rate,
        "rounds": args.rounds,
        "cpu_us_per_request": figures,
        "targets_met": {
            f"at most {TARGET_US:g} us a request at {sizes[-1]:,} users": (
                ours[largest] <= TARGET_US
            ),
        },
    }
    publish(SCENARIO, result, _markdown(result), args.output, args.markdown)
    print(_markdown(result))


if __name__ == "__main__":
    main()
