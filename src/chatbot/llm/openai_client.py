"""Any OpenAI-compatible Chat Completions endpoint, through the official async client."""

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import httpx
import httpx2
import openai
import orjson
from openai import AsyncOpenAI

from chatbot import json_codec
from chatbot.config import Settings
from chatbot.errors import UpstreamError
from chatbot.llm import refusals
from chatbot.llm.client import (
    MAX_FINISH_REASON_CHARS,
    MAX_MODEL_CHARS,
    Completion,
    CompletionRequest,
    StreamEvent,
    TextDelta,
    TokenUsage,
    ToolCall,
)
from chatbot.llm.errors import (
    UpstreamAuthFailed,
    UpstreamContextExceeded,
    UpstreamDisconnected,
    UpstreamInvalidResponse,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamReportedError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from chatbot.llm.windows import ContextWindows
from chatbot.sanitize import MAX_COUNT, clean_count, clean_label, clean_text

logger = logging.getLogger(__name__)

# Reasoning families reject `max_tokens` and any non-default `temperature`.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_MAX_UPSTREAM_DETAIL = 300
# The pool is httpx2's (the one the `openai` client is built on); tests hand in an httpx client
# instead, which respx can intercept. Failures are caught from either.
HTTPClient = httpx.AsyncClient | httpx2.AsyncClient
_HTTP_ERRORS = (httpx.HTTPError, httpx2.HTTPError)
_TIMEOUTS = (httpx.TimeoutException, httpx2.TimeoutException)
_TRANSPORT_ERRORS = (httpx.TransportError, httpx2.TransportError)
TOOLS_REFUSED_SECONDS = 3600.0
"""How long a model whose server refused tools is sent none before it is offered them again."""
DRAIN_TIMEOUT = 0.5
"""How long the rest of a body after `[DONE]` may take before its connection is dropped."""
_MAX_MODELS_REMEMBERED = 1024
"""Models remembered as taking no tools: the model is the client's to choose."""


def is_reasoning_model(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    return name.startswith(_REASONING_PREFIXES) and not name.startswith("gpt-5-chat")


def request_params(
    request: CompletionRequest, *, reasoning: bool, tools: bool = True
) -> dict[str, Any]:
    """The body of a call; without its tools when `tools` is false (a server that takes none)."""
    params: dict[str, Any] = {
        "model": request.model,
        "messages": [message.to_openai() for message in request.messages],
    }
    if request.max_output_tokens is not None:
        key = "max_completion_tokens" if reasoning else "max_tokens"
        params[key] = request.max_output_tokens
    if request.temperature is not None and not reasoning:
        params["temperature"] = request.temperature
    if request.tools and tools:
        params["tools"] = request.tools
        if request.tool_choice is not None:
            params["tool_choice"] = request.tool_choice
    return params


def build_http_client(settings: Settings) -> httpx2.AsyncClient:
    """Our own pool: bounded connections, and a read timeout that bounds silence between chunks.

    The `openai` package's own aiohttp transport (its `aiohttp` extra): aiohttp parses HTTP in
    C, where httpx2's default transport (httpcore2, h11 and anyio) does it in Python, which
    cost more CPU per relayed token than the rest of relaying it (see the README, "Choices").
    The client on top is the SDK's httpx2 client as ever: its auth, retries and errors."""
    return openai.DefaultAioHttpClient(
        timeout=httpx2.Timeout(
            settings.upstream_timeout,
            connect=settings.upstream_connect_timeout,
            pool=settings.upstream_connect_timeout,
        ),
        limits=httpx2.Limits(
            max_connections=settings.upstream_max_connections,
            max_keepalive_connections=min(100, settings.upstream_max_connections),
        ),
    )


class OpenAIChatClient:
    def __init__(self, settings: Settings, http_client: HTTPClient | None = None) -> None:
        self._http = http_client or build_http_client(settings)
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        self._client = AsyncOpenAI(
            # Local servers (Ollama, vLLM, llama.cpp) accept any key; the client insists on one.
            api_key=api_key or "not-needed",
            base_url=settings.openai_base_url,
            max_retries=settings.upstream_max_retries,
            http_client=cast(Any, self._http),
        )
        self.windows = ContextWindows(settings, self._http)
        """The context window of each model, asked of the server behind the base URL."""
        self._without_tools: dict[str, float] = {}
        """Models whose server refused the tools of a request, and until when they are sent
        none (a server restarted with tool support gets them again after a while)."""

    def model_label(self, requested: str) -> str:
        return requested

    def takes_tools(self, model: str) -> bool:
        until = self._without_tools.get(model)
        return until is None or until <= time.monotonic()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[StreamEvent]:
        """The client makes the request (auth, retries, error mapping); the chunks are read as
        plain JSON, since building the SDK's models for each of them costs more than all the
        rest of relaying a delta."""
        response = await self._open(request)
        finish_reason: str | None = None
        usage: TokenUsage | None = None
        model: str | None = None
        calls = _ToolCalls()
        lines = _lines(_body(response))
        named: object = None
        try:
            async for chunk in _chunks(lines):
                if (name := chunk.get("model")) != named:  # every chunk repeats it
                    named = name
                    model = _label(name, MAX_MODEL_CHARS) or model
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"]) or usage
                choices = chunk.get("choices")
                if choices:
                    choice = choices[0]
                    delta = choice.get("delta") or {}
                    if content := delta.get("content"):
                        yield TextDelta(_text(content))
                    if fragments := delta.get("tool_calls"):
                        calls.add(fragments)
                    if choice.get("finish_reason"):
                        finish_reason = _label(choice["finish_reason"], MAX_FINISH_REASON_CHARS)
        except (*_HTTP_ERRORS, ValueError, TypeError, AttributeError, LookupError) as exc:
            # ValueError and friends: a chunk that is not JSON, or not the shape of a chunk.
            raise upstream_error(exc, mid_stream=True) from exc
        else:
            await _drain(lines)
        finally:
            await response.aclose()
        try:
            tool_calls = calls.assembled()
        except (ValueError, TypeError) as exc:
            raise upstream_error(exc, mid_stream=True) from exc
        yield Completion(
            finish_reason=finish_reason, usage=usage, model=model, tool_calls=tool_calls
        )

    async def _open(self, request: CompletionRequest) -> httpx.Response | httpx2.Response:
        """The streaming response, its status checked; its body is for the caller to read.

        A rejection the request can be changed to avoid is retried once per change: the other
        parameter style, or no tools for a server that takes none (remembered for the model).
        A prompt the server says is too long raises UpstreamContextExceeded, the window it
        named learned for the model."""
        reasoning = is_reasoning_model(request.model)
        adjusted = False
        tools = bool(request.tools) and self.takes_tools(request.model)
        while True:
            params = request_params(request, reasoning=reasoning, tools=tools)
            try:
                # The client's generic POST: its auth, retries, timeouts and error types, without
                # the typed `create`, whose walk over every parameter costs more than the rest
                # of a turn. The parameters are plain JSON already.
                stream = await self._client.post(
                    "/chat/completions",
                    cast_to=object,
                    # Encoded here: the client's own encoder walks the whole history slower.
                    content=json_codec.dumps(
                        {**params, "stream": True, "stream_options": {"include_usage": True}}
                    ),
                    options={"security": {"bearer_auth": True}},
                    stream=True,
                    stream_cls=openai.AsyncStream[object],
                )
                return cast(httpx.Response | httpx2.Response, stream.response)
            except openai.APIStatusError as exc:
                # An unknown model behind a compatible endpoint may be a reasoning model
                # (or not): switch parameter style once when the upstream says so.
                if (
                    isinstance(exc, openai.BadRequestError)
                    and not adjusted
                    and _rejects_parameter_style(exc, reasoning)
                ):
                    adjusted, reasoning = True, not reasoning
                    logger.info("retrying %s with the other parameter style", request.model)
                    continue
                if tools and refusals.rejects_tools(exc):
                    tools = False
                    if request.tool_choice is None:
                        self._refuses_tools(request.model)
                    # else: refused with `tool_choice: "none"` (the last round), which may be
                    # all the server objects to; without tools is what that round asks anyway.
                    continue
                raise self._rejection(exc, request.model) from exc
            except (openai.APIError, *_HTTP_ERRORS) as exc:
                raise upstream_error(exc) from exc

    def _refuses_tools(self, model: str) -> None:
        if self.takes_tools(model):
            logger.info(
                "the model provider refuses tools for %s; sending it none for %gs",
                model,
                TOOLS_REFUSED_SECONDS,
            )
            if len(self._without_tools) >= _MAX_MODELS_REMEMBERED:
                self._without_tools.clear()
        self._without_tools[model] = time.monotonic() + TOOLS_REFUSED_SECONDS

    def _rejection(self, exc: openai.APIStatusError, model: str) -> UpstreamError:
        exceeded, window = refusals.context_overflow(exc)
        if not exceeded:
            return upstream_error(exc)
        if window is not None and self.windows.learn(model, window) is None:
            window = None  # not a number to plan with
        return UpstreamContextExceeded(
            _upstream_detail(exc, "rejected the prompt as too long"), window=window
        )

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()


MAX_TOOL_CALLS = 64
"""Tool calls one response may make; more is an invalid response."""
MAX_TOOL_NAME_CHARS = 256
MAX_TOOL_ARGUMENTS_CHARS = 256_000
"""Characters of arguments, all of one response's calls together: they are held in memory,
stored and streamed whole, so a model that never stops writing them is cut off."""


class _ToolCalls:
    """Streamed tool calls: the first fragment of each names it (its `index`, `id` and function
    name), the next ones add to its arguments. Providers that send a call whole, or leave out
    `index`, fit the same rules. Their number and size are bounded (ValueError past them)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}
        self._argument_chars = 0

    def add(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            raise TypeError("tool_calls is not a list")
        for fragment in fragments:
            if not isinstance(fragment, dict):
                raise TypeError("a tool call fragment is not an object")
            index = fragment.get("index")
            if not isinstance(index, int):
                # No index: a new call when it brings an id, else more of the last one.
                last = max(self._calls, default=-1)
                index = last + 1 if fragment.get("id") or last < 0 else last
            if index not in self._calls and len(self._calls) >= MAX_TOOL_CALLS:
                raise ValueError(f"more than {MAX_TOOL_CALLS} tool calls")
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            function = fragment.get("function") or {}
            if not isinstance(function, dict):
                raise TypeError("a tool call's function is not an object")
            if fragment.get("id"):
                call["id"] = _text(fragment["id"])[:MAX_TOOL_NAME_CHARS]
            if function.get("name"):
                call["name"] += _text(function["name"])
                if len(call["name"]) > MAX_TOOL_NAME_CHARS:
                    raise ValueError("a tool call's name is too long")
            if function.get("arguments"):
                arguments = _text(function["arguments"])
                self._argument_chars += len(arguments)
                if self._argument_chars > MAX_TOOL_ARGUMENTS_CHARS:
                    raise ValueError(f"tool call arguments past {MAX_TOOL_ARGUMENTS_CHARS} chars")
                call["arguments"].append(arguments)

    def assembled(self) -> tuple[ToolCall, ...]:
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call["name"]:
                raise ValueError("a tool call came without a function name")
            calls.append(
                ToolCall(
                    id=call["id"] or f"call_{index}",
                    name=call["name"],
                    arguments="".join(call["arguments"]),
                )
            )
        return tuple(calls)


async def _drain(lines: AsyncIterator[bytes]) -> None:
    """Read what follows `[DONE]` (the end of the chunked body), so that the connection goes
    back to the pool instead of being closed: a new one to a provider costs a TLS handshake.
    An upstream that keeps the body open after `[DONE]` loses its connection instead."""
    with contextlib.suppress(TimeoutError, ValueError, *_HTTP_ERRORS):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            async for _ in lines:
                pass


MAX_LINE_BYTES = 8 * 1024 * 1024
"""The longest line of an upstream's event stream: a chunk carrying all of a response's tool
call arguments fits several times over; a line that never ends is cut off, not held."""


def _body(response: httpx.Response | httpx2.Response) -> AsyncIterator[bytes]:
    """The body as it comes, or decoded when the server compressed it anyway."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    return response.aiter_raw() if encoding in ("", "identity") else response.aiter_bytes()


async def _lines(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of an event stream, as bytes, whichever of LF, CRLF or CR ends them: one
    generator over the body instead of the client's four (bytes, text, lines), each of which
    costs a resumption per token."""
    pending = b""
    async for block in body:
        lines = (pending + block if pending else block).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LINE_BYTES:
            raise ValueError(f"an event stream line longer than {MAX_LINE_BYTES} bytes")
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if b"\r" in line:  # lines ended by CR alone
                for part in line.split(b"\r"):
                    yield part
            else:
                yield line
    if pending:
        for part in pending.rstrip(b"\r").split(b"\r"):
            yield part


async def _chunks(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a Chat Completions event stream, up to `[DONE]`."""
    data: list[bytes] = []
    event: bytes | None = None
    async for line in lines:
        if line:
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                event = value
            continue  # comments (": ping"), id and retry lines
        if data:
            payload, data = b"\n".join(data), []
            if payload == b"[DONE]":
                return
            yield _chunk(payload, event)
        event = None
    if data and (payload := b"\n".join(data)) != b"[DONE]":
        yield _chunk(payload, event)  # a last event without its blank line


def _chunk(payload: bytes, event: bytes | None) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        # What orjson refuses and the standard parser takes: bytes that are not UTF-8
        # (replaced, as a text decoder would), NaN, integers past 64 bits.
        chunk = json.loads(payload.decode("utf-8", "replace"))
    if not isinstance(chunk, dict):
        raise ValueError("a chunk is not a JSON object")
    if event == b"error" or chunk.get("error"):
        raise UpstreamReportedError()
    return chunk


def _usage(usage: object) -> TokenUsage | None:
    """The usage a provider reported, if its counts are counts; a provider that sends nonsense
    here loses its usage, never its reply (the service counts the reply itself)."""
    if not isinstance(usage, dict):
        return None
    counts = [
        0 if usage.get(name) is None else clean_count(usage[name])  # left out: none counted
        for name in ("prompt_tokens", "completion_tokens")
    ]
    prompt, completion = counts
    if prompt is None or completion is None:
        return None
    total = clean_count(usage.get("total_tokens"))
    return TokenUsage(prompt, completion, min(MAX_COUNT, total or prompt + completion))


def _text(content: object) -> str:
    """Text as it enters from the provider: made storable here, once."""
    if not isinstance(content, str):
        raise TypeError("delta content is not text")
    return clean_text(content)


def _label(value: object, max_chars: int) -> str | None:
    return clean_label(value, max_chars) if isinstance(value, str) else None


def _rejects_parameter_style(exc: openai.BadRequestError, reasoning: bool) -> bool:
    message = str(exc.message).lower()
    if reasoning:
        return "max_completion_tokens" in message and "max_tokens" in message
    return "max_completion_tokens" in message or (
        "temperature" in message and "unsupported" in message
    )


_URL_OR_HOST = re.compile(
    r"[a-z][a-z0-9+.-]*://\S*"  # a URL
    r"|[^\s@]{0,64}@\S+"  # an address, or credentials in one
    r"|\b\d{1,3}(?:\.\d{1,3}){3}\b"  # an IPv4 address
    r"|\b[0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f:]{0,39}"  # an IPv6 address
    r"|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z][a-z-]*[a-z]\b"  # a host name: api.example.com
    r"|\b[a-z0-9.-]+:\d{2,5}\b"  # host:port
    r"|\blocalhost\b|\bport \d{2,5}\b",  # a local host, a port named
    re.IGNORECASE,
)
_KEY_LIKE = re.compile(
    r"\b(?:sk|pk|rk|key|api|tok|bearer|ghp|xox[a-z])[-_][A-Za-z0-9_\-*.]{3,}"  # sk-..., key-...
    r"|\b(?:bearer|basic)\s+\S{8,}"  # a credential as a header carries it
    r"|\b(?:key|token|secret|password|passwd|pwd)\s*[=:]\s*\S+"  # key=..., password: ...
    r"|[A-Za-z0-9_\-*.+/=]{24,}",  # a long run of token characters
    re.IGNORECASE,
)
_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_LOGGED_DETAIL = 2000


def shareable(message: str) -> bool:
    """Whether a provider's error message may reach clients: the rule that keeps keys, hosts
    and URLs out. At most 300 characters, and nothing in it that looks like a URL, an email
    address or credentials in one, an IP address, a host name (`api.example.com`, `db:5432`;
    not a model name such as `gpt-4.1`),
    or a key (`sk-...` and its kin, or any run of 24 token characters). A message that fails
    the rule is left out whole: a part of it could still give the rest away."""
    return (
        len(message) <= _MAX_UPSTREAM_DETAIL
        and _URL_OR_HOST.search(message) is None
        and _KEY_LIKE.search(message) is None
    )


def redacted(message: str) -> str:
    """A provider's error message for the log: whatever the rule would object to replaced.
    Cut first: an error page of megabytes must cost the event loop nothing much."""
    message = message[:_MAX_LOGGED_DETAIL].replace("\n", " ").replace("\r", " ")
    return _KEY_LIKE.sub("[redacted]", _URL_OR_HOST.sub("[redacted]", message))


def _provider_error(exc: openai.APIStatusError) -> tuple[str | None, str]:
    """The provider's error type or code (when it is a plain identifier) and its message."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    kind = None
    message = str(exc.message)
    if isinstance(inner, dict):
        for field in ("code", "type"):
            value = inner.get(field)
            if isinstance(value, str | int) and _CODE.match(str(value)) and shareable(str(value)):
                kind = str(value)
                break
        if isinstance(inner.get("message"), str):
            message = inner["message"]
    return kind, clean_text(message)


def _upstream_detail(exc: openai.APIStatusError, what: str) -> str:
    """What clients are told of a provider's error: its status, its type or code, and its
    message when `shareable`; the whole of it goes to the log, redacted."""
    kind, message = _provider_error(exc)
    logger.warning(
        "the model provider answered %d%s: %s",
        exc.status_code,
        f" ({kind})" if kind else "",
        redacted(message),
    )
    said = f" {kind}" if kind else ""
    detail = f"The model provider {what} (status {exc.status_code}{said})"
    return f"{detail}: {message}" if message and shareable(message) else detail


def _refused_connection(exc: BaseException) -> bool:
    """Whether aiohttp failed to connect or lost the connection, which the aiohttp transport
    reports as a timeout (its map of errors takes the first that matches)."""
    cause = exc.__cause__
    for _ in range(4):
        if cause is None:
            return False
        if isinstance(cause, aiohttp.ClientError):
            return not isinstance(cause, TimeoutError)
        cause = cause.__cause__
    return False


def upstream_error(exc: Exception, *, mid_stream: bool = False) -> UpstreamError:
    """Map every provider or network failure once: 429, 504, 503 or 502."""
    if isinstance(exc, openai.RateLimitError):
        headers = {}
        retry_after = exc.response.headers.get("retry-after")
        if retry_after and retry_after.strip().isdigit():
            headers["Retry-After"] = retry_after.strip()
        return UpstreamRateLimited(headers=headers or None)
    if isinstance(exc, (openai.APITimeoutError, *_TIMEOUTS)) and not _refused_connection(exc):
        return UpstreamTimeout()
    if mid_stream and isinstance(exc, (openai.APIConnectionError, *_TRANSPORT_ERRORS)):
        return UpstreamDisconnected()
    if isinstance(exc, (openai.APIConnectionError, *_TRANSPORT_ERRORS)):
        return UpstreamUnavailable()
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        # The provider's text may quote part of our key: keep it out of the response.
        return UpstreamAuthFailed()
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code in (400, 404, 422):
            return UpstreamRejected(_upstream_detail(exc, "rejected the request"))
        return UpstreamError(_upstream_detail(exc, "failed"))
    return UpstreamInvalidResponse()
