"""The fake OpenAI-compatible upstream of the benchmarks, with one reply shape per model name.

A benchmark needs a realistic wait before the first token and replies of different lengths in
one run (short ones to time requests one after the other, long ones to hold many streams open),
and an upstream that costs little CPU, since it shares the machine with what it measures. Each
`--reply MODEL:TOKENS:PER_SECOND` names a shape; a model not named gets the first. A streamed
reply (`"stream": true`) sends the empty role chunk at once, as real providers do, waits
`--ttft-ms`, sends its tokens at their pace as `chat.completion.chunk` events, a last chunk
with the finish reason, a usage chunk when `stream_options.include_usage` asks for it, then
`[DONE]`; any other request gets the whole reply as one `chat.completion`. The utility model
(`utility-model`: the service's titles and summaries) gets a short reply at once. Connections
are kept alive; requests are not recorded, so memory stays flat.

    python bench/harness/upstream.py --port 9100 --ttft-ms 50 --reply bench-short:10:200

It imports nothing but the standard library (and uvloop when there is one), so that it runs as
a script of its own, and in-process too (`BenchUpstream(...).start()`).
"""

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

UTILITY_MODEL = "utility-model"
"""The model the service is told to use for its chores (CHATBOT_UTILITY_MODEL)."""
UTILITY_TOKENS = ("A", " fine", " title")
PROMPT_TOKENS = 11
"""What every usage reports for the prompt: the benchmarks count completion tokens only."""


@dataclass(frozen=True)
class ReplyShape:
    """What the upstream answers to one model name, after its wait for the first token."""

    model: str
    tokens: int
    per_second: float

    def seconds(self, ttft_ms: float) -> float:
        """How long one reply takes, first token to last, at the given wait before the first."""
        return ttft_ms / 1000 + (self.tokens - 1) / self.per_second

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "tokens": self.tokens, "per_second": self.per_second}

    def token_texts(self) -> list[str]:
        """The reply's tokens: distinct, so that a client can check the text word for word."""
        return [f" token{index}" for index in range(self.tokens)]

    def text(self) -> str:
        return "".join(self.token_texts())

    def option(self) -> str:
        """This shape as a `--reply` option of the upstream's command line."""
        return f"--reply={self.model}:{self.tokens}:{self.per_second:g}"

    @classmethod
    def parse(cls, text: str) -> "ReplyShape":
        model, tokens, per_second = text.split(":")
        return cls(model, int(tokens), float(per_second))


@dataclass(frozen=True)
class Reply:
    model: str
    tokens: tuple[str, ...]
    first_token_delay: float = 0.0
    token_delay: float = 0.0


class BenchUpstream:
    def __init__(
        self,
        shapes: list[ReplyShape],
        ttft_ms: float,
        utility_tokens: tuple[str, ...] = UTILITY_TOKENS,
    ) -> None:
        self.replies = {
            shape.model: Reply(
                shape.model,
                tuple(shape.token_texts()),
                first_token_delay=ttft_ms / 1000,
                token_delay=1 / shape.per_second,
            )
            for shape in shapes
        }
        self.default = next(iter(self.replies.values()))
        self.utility = Reply(UTILITY_MODEL, utility_tokens)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> "BenchUpstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for handler in list(self._handlers):
            handler.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or stop() ended this connection
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request on a kept-alive connection: its head, its JSON body, the reply."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        raw = await reader.readexactly(length)
        body = json.loads(raw) if raw else {}
        model = str(body.get("model"))
        reply = self.utility if model == UTILITY_MODEL else self.replies.get(model, self.default)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            await _stream(writer, reply, include_usage=usage)
        else:
            await _send_json(writer, _completion(reply))


def _usage(reply: Reply) -> dict[str, int]:
    completion = len(reply.tokens)
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }


def _completion(reply: Reply) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(reply.tokens)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(reply),
    }


def _chunk(reply: Reply, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def _send_json(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, reply: Reply, *, include_usage: bool) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
    )

    async def event(payload: dict[str, Any] | str) -> None:
        # One HTTP chunk per event, drained at once: each token leaves when it is due. The
        # default separators of json.dumps (`"content": "`) are what clients count tokens by.
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    await event(_chunk(reply, {"role": "assistant", "content": ""}))
    if reply.first_token_delay:
        await asyncio.sleep(reply.first_token_delay)
    for index, token in enumerate(reply.tokens):
        if index and reply.token_delay:
            await asyncio.sleep(reply.token_delay)
        await event(_chunk(reply, {"content": token}))
    await event(_chunk(reply, {}, "stop"))
    if include_usage:
        await event({**_chunk(reply, {}), "choices": [], "usage": _usage(reply)})
    await event("[DONE]")
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=50, help="wait before the first token")
    parser.add_argument(
        "--reply",
        action="append",
        type=ReplyShape.parse,
        metavar="MODEL:TOKENS:PER_SECOND",
        help="a reply shape for one model name (repeatable; the first is the default)",
    )
    args = parser.parse_args()
    shapes = args.reply or [ReplyShape("fake-model", 40, 20)]
    upstream = await BenchUpstream(shapes, args.ttft_ms).start(args.port)
    print(f"fake OpenAI-compatible upstream at {upstream.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        from uvloop import run  # the service's own loop, so the upstream costs little CPU
    except ImportError:
        from asyncio import run
    with contextlib.suppress(KeyboardInterrupt):
        run(_main())
