"""The fake OpenAI-compatible upstream of the benchmarks, with one reply shape per model name.

`tests/fake_upstream.py` answers every request alike; the benchmarks need a realistic wait before
the first token and replies of different lengths in one run (short ones to time requests one
after the other, long ones to hold many streams open). Each `--reply MODEL:TOKENS:PER_SECOND`
names a shape; a model not named gets the first. Every streamed reply waits `--ttft-ms` before
its first token (after the empty role chunk, as real providers send it) and ends with usage in
its last chunk when the client asks for it. Requests are not recorded, so memory stays flat.

    python bench/upstream.py --port 9100 --ttft-ms 50 --reply bench-short:10:200
"""

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import (  # noqa: E402
    UTILITY_MODEL,
    FakeUpstream,
    Reply,
    _completion,
    _send_json,
)


class ShapedUpstream(FakeUpstream):
    def __init__(self, replies: dict[str, Reply]) -> None:
        super().__init__(next(iter(replies.values())))
        self.replies = replies
        self.served = 0

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        raw = await reader.readexactly(length)
        body = json.loads(raw) if raw else {}
        model = body.get("model")
        if model == UTILITY_MODEL:
            reply = self.utility_default
        else:
            reply = self.replies.get(str(model), self.default)
        self.served += 1
        if not body.get("stream"):
            await _send_json(writer, 200, _completion(reply), reply)
            return True
        return await self._stream(
            reader, writer, reply, include_usage=bool(body.get("stream_options"))
        )


def _shape(text: str, ttft_ms: float) -> tuple[str, Reply]:
    model, tokens, per_second = text.split(":")
    return model, Reply(
        tokens=[f" token{index}" for index in range(int(tokens))],
        first_token_delay=ttft_ms / 1000,
        token_delay=1 / float(per_second),
        model=model,
    )


async def _main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=50, help="wait before the first token")
    parser.add_argument(
        "--reply",
        action="append",
        metavar="MODEL:TOKENS:PER_SECOND",
        help="a reply shape for one model name (repeatable; the first is the default)",
    )
    args = parser.parse_args()
    shapes = dict(_shape(text, args.ttft_ms) for text in args.reply or ["fake-model:40:20"])
    upstream = await ShapedUpstream(shapes).start(args.port)
    print(f"fake OpenAI-compatible upstream at {upstream.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        from uvloop import run  # the service's own loop, so the upstream costs little CPU
    except ImportError:
        from asyncio import run
    with contextlib.suppress(KeyboardInterrupt):
        run(_main())
