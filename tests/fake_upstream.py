"""A small OpenAI-compatible server on a real socket, scriptable per request.

Written on raw asyncio streams so it can misbehave the way real networks do: stall before
or between tokens, drop the connection mid-reply, send garbage. Tests queue `Reply` scripts;
with none queued it answers with `default`. It can also pass for a local model server
(`like_llama_cpp`, `like_vllm`, `like_ollama`, `like_lmstudio`): the routes that tell its
context window, its answer to a prompt longer than that window, to tools it takes none of, and
streams without usage. Run it alone for manual checks:

    python tests/fake_upstream.py --port 9100 --tokens-per-second 20
"""

import argparse
import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from chatbot.context.tokens import REPLY_PRIMING_TOKENS, TokenCounter


@dataclass
class Reply:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    # Sent after the first token, then the rest waits for it: lets a test act mid-reply.
    gate: asyncio.Event | None = None
    drop_after: int | None = None
    hang_after: int | None = None
    garbage_after: int | None = None
    open_after_done: bool = False
    """Keep the body open after `[DONE]` instead of ending it."""
    tool_calls: list[tuple[str, str, str]] = field(default_factory=list)
    """(id, function name, arguments) of calls streamed after the text, arguments in pieces of
    `fragment_size` characters, as OpenAI streams them; the reply then finishes `tool_calls`."""
    fragment_size: int = 5
    finish_reason: str = "stop"
    usage: bool = True
    usage_numbers: dict[str, Any] | None = None
    """The usage chunk's numbers as sent, instead of counts of the tokens (any JSON)."""
    model: str = "fake-model"


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    client_port: int = 0
    """The client's end of the connection: requests that share it came over one connection."""


@dataclass
class Route:
    """What a route other than chat completions answers: JSON `body`, or `raw` bytes as they
    are, after `delay` seconds."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    delay: float = 0.0


@dataclass
class Refusal:
    """A server's answer to a request it will not take."""

    status: int
    body: dict[str, Any]


OverflowAnswer = Callable[[int, int], Refusal]
"""The answer to a prompt of n tokens (second) longer than the window (first)."""

UTILITY_MODEL = "utility-model"
_COUNTER = TokenCounter()


def prompt_tokens(body: dict[str, Any]) -> int:
    """A request's prompt as the service counts it: each message framed, tool calls and tool
    definitions as JSON, and the reply's priming. The fake counts as the service does, so that
    a prompt planned to fit does."""
    model = str(body.get("model") or "")
    total = REPLY_PRIMING_TOKENS
    for message in body.get("messages") or []:
        total += _COUNTER.count_message(str(message.get("content") or ""), model)
        if message.get("tool_calls"):
            total += _COUNTER.count_text(json.dumps(message["tool_calls"]), model)
    if body.get("tools"):
        total += _COUNTER.count_text(json.dumps(body["tools"]), model)
    return total


def llama_cpp_overflow(window: int, tokens: int) -> Refusal:
    return Refusal(
        400,
        {
            "error": {
                "code": 400,
                "message": f"request ({tokens} tokens) exceeds the available context size "
                f"({window} tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": tokens,
                "n_ctx": window,
            }
        },
    )


def vllm_overflow(window: int, tokens: int) -> Refusal:
    return Refusal(
        400,
        {
            "object": "error",
            "message": f"This model's maximum context length is {window} tokens. However, you "
            f"requested {tokens} tokens ({tokens} in the messages, 0 in the completion). "
            "Please reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    )


def lmstudio_overflow(window: int, tokens: int) -> Refusal:
    return Refusal(
        400,
        {
            "error": f"Trying to keep the first {tokens} tokens when context the overflows. "
            f"However, the model is loaded with context length of only {window} tokens, "
            "which is not enough. Try to load the model with a larger context length, or "
            "provide a shorter input"
        },
    )


LLAMA_CPP_NO_JINJA = Refusal(
    500,
    {
        "error": {
            "code": 500,
            "message": "tools param requires --jinja flag",
            "type": "server_error",
        }
    },
)
VLLM_NO_TOOL_PARSER = Refusal(
    400,
    {
        "object": "error",
        "message": '"auto" tool choice requires --enable-auto-tool-choice and '
        "--tool-call-parser to be set",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
)


def ollama_no_tools(model: str) -> Refusal:
    return Refusal(
        400,
        {
            "error": {
                "message": f"registry.ollama.ai/library/{model} does not support tools",
                "type": "api_error",
                "param": None,
                "code": None,
            }
        },
    )


class FakeUpstream:
    """Requests for UTILITY_MODEL (titles, summaries) get scripts and a record of their own."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.script: deque[Reply] = deque()
        self.requests: list[ReceivedRequest] = []
        self.utility_default = Reply(tokens=["A", " fine", " title"])
        self.utility_script: deque[Reply] = deque()
        self.utility_requests: list[ReceivedRequest] = []
        self.open_connections = 0
        self.disconnects = 0
        """Streams the client closed while this server was still holding the reply."""
        self.routes: dict[tuple[str, str], Route] = {}
        """Answers to (method, path) other than chat completions; others are 404."""
        self.probes: list[ReceivedRequest] = []
        """Requests to those other routes, whatever they were answered."""
        self.context_window: int | None = None
        """Prompts (as `prompt_tokens` counts them) longer than this get `overflow`'s answer."""
        self.overflow: OverflowAnswer = vllm_overflow
        self.count_factor = 1.0
        """How many of its tokens the server counts for one of the service's."""
        self.rejected: list[ReceivedRequest] = []
        """Chat requests refused for their length or their tools (also in `requests`)."""
        self.tools_refusal: Refusal | None = None
        """The answer to any chat request that carries tools, if this server takes none."""
        self.refuses_only_tool_choice = False
        """With `tools_refusal`: refuse only requests that carry a `tool_choice`."""
        self.stream_usage = True
        """False: streams carry no usage chunk, whatever the request asks (llama.cpp)."""
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *replies: Reply) -> None:
        self.script.extend(replies)

    # --- passing for a local server -----------------------------------------------------------

    def like_llama_cpp(
        self, n_ctx: int = 2048, *, props_n_ctx: int | None = None, jinja: bool = True
    ) -> None:
        """llama.cpp's server: `/props` names the slot's context (`props_n_ctx` if it should
        say otherwise), a longer prompt is its 400, no usage in streams; without `--jinja` it
        refuses tools with a 500."""
        self.routes[("GET", "/props")] = Route(
            body={
                "default_generation_settings": {"n_ctx": props_n_ctx or n_ctx, "n_predict": -1},
                "total_slots": 1,
                "model_path": "/models/model.gguf",
                "chat_template": "{{ messages }}",
            }
        )
        self.routes[("GET", "/v1/models")] = Route(
            body={"object": "list", "data": [{"id": "model.gguf", "meta": {"n_ctx_train": 131072}}]}
        )
        self.context_window, self.overflow = n_ctx, llama_cpp_overflow
        self.stream_usage = False
        self.tools_refusal = None if jinja else LLAMA_CPP_NO_JINJA

    def like_vllm(
        self, model: str, max_model_len: int, *, enforced: int | None = None, tools: bool = True
    ) -> None:
        """vLLM: `/v1/models` names `max_model_len`; a longer prompt (longer than `enforced`,
        if the listing should lie) is its 400; without a tool parser it refuses tools."""
        self.routes[("GET", "/v1/models")] = Route(
            body={
                "object": "list",
                "data": [{"id": model, "object": "model", "max_model_len": max_model_len}],
            }
        )
        self.context_window, self.overflow = enforced or max_model_len, vllm_overflow
        self.tools_refusal = None if tools else VLLM_NO_TOOL_PARSER

    def like_ollama(
        self,
        model: str,
        context_length: int = 131072,
        *,
        num_ctx: int | None = None,
        tools: bool = True,
    ) -> None:
        """Ollama: `/api/show` names the model's length and its Modelfile's parameters; the
        OpenAI endpoint runs `num_ctx` (4,096 unset), and cuts a longer prompt silently; a
        model without tool support refuses tools."""
        parameters = 'stop "<|eot_id|>"'
        if num_ctx is not None:
            parameters += f"\nnum_ctx {num_ctx}"
        self.routes[("POST", "/api/show")] = Route(
            body={
                "modelfile": "FROM llama3.2",
                "parameters": parameters,
                "template": "{{ .Prompt }}",
                "details": {"family": "llama", "parameter_size": "3.2B"},
                "model_info": {
                    "general.architecture": "llama",
                    "llama.context_length": context_length,
                },
            }
        )
        self.routes[("GET", "/v1/models")] = Route(
            body={"object": "list", "data": [{"id": model, "object": "model"}]}
        )
        self.context_window = None
        self.tools_refusal = None if tools else ollama_no_tools(model)

    def like_lmstudio(
        self, model: str, max_context_length: int, *, loaded: int | None = None
    ) -> None:
        self.routes[("GET", "/api/v0/models")] = Route(
            body={
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "type": "llm", "state": "loaded"}
                    | {"max_context_length": max_context_length}
                    | ({"loaded_context_length": loaded} if loaded else {})
                ],
            }
        )
        self.context_window, self.overflow = loaded or max_context_length, lmstudio_overflow

    async def start(self, port: int = 0) -> "FakeUpstream":
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
        self.open_connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or stop() ended this connection
        finally:
            self.open_connections -= 1
            self._handlers.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        _, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        body = json.loads(raw) if raw else {}
        received = ReceivedRequest(path, headers, body, writer.get_extra_info("peername")[1])
        method = request_line.split(" ", 1)[0]
        if not path.split("?", 1)[0].endswith("/chat/completions"):
            await self._answer_route(writer, method, path.split("?", 1)[0], received)
            return True
        if body.get("model") == UTILITY_MODEL:
            self.utility_requests.append(received)
            reply = self.utility_script.popleft() if self.utility_script else self.utility_default
        else:
            self.requests.append(received)
            if (refusal := self._refusal(body)) is not None:
                self.rejected.append(received)
                await _send_json(writer, refusal.status, refusal.body, Reply())
                return True
            reply = self.script.popleft() if self.script else self.default
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and len(reply.tokens) > limit:  # as providers cut a reply
            reply = replace(
                reply, tokens=reply.tokens[:limit], tool_calls=[], finish_reason="length"
            )
        if reply.status != 200:
            await _send_json(writer, reply.status, reply.error or _error_body(reply.status), reply)
            return True
        if not body.get("stream"):
            await _send_json(writer, 200, _completion(reply), reply)
            return True
        return await self._stream(
            reader,
            writer,
            reply,
            include_usage=bool(body.get("stream_options")) and self.stream_usage,
        )

    def _refusal(self, body: dict[str, Any]) -> Refusal | None:
        refused = not self.refuses_only_tool_choice or body.get("tool_choice")
        if self.tools_refusal is not None and body.get("tools") and refused:
            return self.tools_refusal
        if self.context_window is not None:
            tokens = int(prompt_tokens(body) * self.count_factor)
            tokens += int(body.get("max_tokens") or 0)
            if tokens > self.context_window:
                return self.overflow(self.context_window, tokens)
        return None

    async def _answer_route(
        self, writer: asyncio.StreamWriter, method: str, path: str, received: ReceivedRequest
    ) -> None:
        self.probes.append(received)
        route = self.routes.get((method, path))
        if route is None:
            route = Route(404, {"error": {"message": "Not Found", "type": "not_found_error"}})
        if route.delay:
            await asyncio.sleep(route.delay)
        if route.raw is None:
            await _send_json(writer, route.status, route.body, Reply())
            return
        writer.write(
            f"HTTP/1.1 {route.status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(route.raw)}\r\n\r\n".encode()
            + route.raw
        )
        await writer.drain()

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply: Reply,
        *,
        include_usage: bool,
    ) -> bool:
        async def hold(gate: asyncio.Event) -> bool:
            """Wait for the gate; False if the client hung up meanwhile."""
            opened = asyncio.ensure_future(gate.wait())
            closed = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait({opened, closed}, return_when=asyncio.FIRST_COMPLETED)
            opened.cancel()
            closed.cancel()
            # Reap the read, or the next request's readuntil finds it still waiting.
            await asyncio.gather(opened, closed, return_exceptions=True)
            if closed in done and not closed.result():
                self.disconnects += 1
                return False
            return True

        return await _stream(writer, reply, include_usage=include_usage, hold=hold)


def _error_body(status: int) -> dict[str, Any]:
    return {"error": {"message": f"fake upstream error {status}", "type": "server_error"}}


def _completion(reply: Reply) -> dict[str, Any]:
    content = "".join(reply.tokens)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": _usage(reply),
    }


def _usage(reply: Reply) -> dict[str, Any]:
    if reply.usage_numbers is not None:
        return reply.usage_numbers
    completion_tokens = len(reply.tokens)
    return {
        "prompt_tokens": 11,
        "completion_tokens": completion_tokens,
        "total_tokens": 11 + completion_tokens,
    }


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any, reply: Reply) -> None:
    data = json.dumps(payload).encode()
    headers = "".join(f"{name}: {value}\r\n" for name, value in reply.headers.items())
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n{headers}\r\n".encode()
        + data
    )
    await writer.drain()


def _chunk(reply: Reply, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def _stream(
    writer: asyncio.StreamWriter,
    reply: Reply,
    *,
    include_usage: bool,
    hold: Callable[[asyncio.Event], Awaitable[bool]],
) -> bool:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
    )

    async def event(payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    await event(_chunk(reply, {"role": "assistant", "content": ""}))
    if reply.first_token_delay:
        await asyncio.sleep(reply.first_token_delay)
    for index, token in enumerate(reply.tokens):
        if index == reply.drop_after:
            writer.transport.abort()
            return False
        if index == reply.hang_after:
            await asyncio.sleep(3600)
        if index == reply.garbage_after:
            await event("{this is not json")
        if index and reply.token_delay:
            await asyncio.sleep(reply.token_delay)
        await event(_chunk(reply, {"content": token}))
        if index == 0 and reply.gate is not None and not await hold(reply.gate):
            return False
    for index, (call_id, name, arguments) in enumerate(reply.tool_calls):
        first = {"index": index, "id": call_id, "type": "function"}
        await event(_chunk(reply, {"tool_calls": [first | {"function": {"name": name}}]}))
        for start in range(0, len(arguments), reply.fragment_size):
            piece = arguments[start : start + reply.fragment_size]
            await event(
                _chunk(reply, {"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            )
    finish = "tool_calls" if reply.tool_calls else reply.finish_reason
    await event(_chunk(reply, {}, finish))
    if include_usage and reply.usage:
        await event({**_chunk(reply, {}), "choices": [], "usage": _usage(reply)})
    await event("[DONE]")
    if reply.open_after_done:
        await asyncio.sleep(3600)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens-per-second", type=float, default=20.0)
    parser.add_argument("--reply-tokens", type=int, default=40)
    args = parser.parse_args()
    tokens = [f" token{index}" for index in range(args.reply_tokens)]
    upstream = FakeUpstream(Reply(tokens=tokens, token_delay=1 / args.tokens_per_second))
    await upstream.start(args.port)
    print(f"fake OpenAI-compatible upstream at {upstream.base_url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
