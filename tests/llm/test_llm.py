"""The upstream request each model family gets, checked at the HTTP layer with respx."""

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from chatbot.config import Settings
from chatbot.errors import UpstreamError
from chatbot.llm import openai_client
from chatbot.llm.client import ChatMessage, Completion, CompletionRequest, TextDelta, ToolCall
from chatbot.llm.demo import DEMO_MODEL, DemoChatClient
from chatbot.llm.openai_client import DRAIN_TIMEOUT, OpenAIChatClient, is_reasoning_model
from tests.fake_upstream import FakeUpstream, Reply
from tests.support import model_events

BASE_URL = "http://upstream.test/v1"


def _sse(*chunks: dict[str, Any]) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def _chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }


STREAM = _sse(
    _chunk("Hi"),
    _chunk(None, "stop"),
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    },
)


def _client() -> OpenAIChatClient:
    settings = Settings(
        _env_file=None, openai_base_url=BASE_URL, openai_api_key="sk-x", upstream_max_retries=0
    )
    return OpenAIChatClient(settings, http_client=httpx.AsyncClient())


async def _run(model: str) -> list[Any]:
    client = _client()
    request = CompletionRequest(
        model=model,
        messages=[ChatMessage("user", "hello")],
        temperature=0.5,
        max_output_tokens=64,
    )
    try:
        return await model_events(client, request)
    finally:
        await client.aclose()


@pytest.mark.parametrize("model", ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "openai/o3"])
async def test_reasoning_models_get_max_completion_tokens_and_no_temperature(model: str) -> None:
    with respx.mock:
        route = respx.post(f"{BASE_URL}/chat/completions").respond(
            200, content=STREAM, headers={"content-type": "text/event-stream"}
        )
        events = await _run(model)
    body = json.loads(route.calls.last.request.content)
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body
    assert "temperature" not in body
    assert events == [
        TextDelta("Hi"),
        Completion(finish_reason="stop", usage=events[-1].usage, model="m"),
    ]
    assert events[-1].usage.total_tokens == 4


@pytest.mark.parametrize("model", ["gpt-4o-mini", "llama3.1:8b", "gemini-2.0-flash", "gpt-5-chat"])
async def test_other_models_get_max_tokens_and_temperature(model: str) -> None:
    with respx.mock:
        route = respx.post(f"{BASE_URL}/chat/completions").respond(
            200, content=STREAM, headers={"content-type": "text/event-stream"}
        )
        await _run(model)
    body = json.loads(route.calls.last.request.content)
    assert body["max_tokens"] == 64
    assert body["temperature"] == 0.5
    assert "max_completion_tokens" not in body
    assert body["stream_options"] == {"include_usage": True}
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-x"


@pytest.mark.parametrize(
    "text",
    ['caf\u00e9 \u2028 \U0001f600 "quoted"\n', "lone \ud800 surrogate"],
    ids=["text", "surrogate"],
)
async def test_the_body_is_json_of_the_messages_as_given(text: str) -> None:
    # Encoded by orjson, or (what it refuses) escaped as the standard encoder writes it.
    client = _client()
    request = CompletionRequest(model="m", messages=[ChatMessage("user", text)])
    try:
        with respx.mock:
            route = respx.post(f"{BASE_URL}/chat/completions").respond(
                200, content=STREAM, headers={"content-type": "text/event-stream"}
            )
            await model_events(client, request)
    finally:
        await client.aclose()
    sent = route.calls.last.request
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.content)["messages"] == [{"role": "user", "content": text}]


async def test_an_unknown_reasoning_model_is_retried_with_the_other_parameter_style() -> None:
    rejection = {
        "error": {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error",
        }
    }
    with respx.mock:
        route = respx.post(f"{BASE_URL}/chat/completions").mock(
            side_effect=[
                httpx.Response(400, json=rejection),
                httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"}),
            ]
        )
        events = await _run("my-private-reasoner")
    first, second = (json.loads(call.request.content) for call in route.calls)
    assert first["max_tokens"] == 64
    assert second["max_completion_tokens"] == 64
    assert "temperature" not in second
    assert events[0] == TextDelta("Hi")


def test_family_detection() -> None:
    assert is_reasoning_model("o3")
    assert is_reasoning_model("azure/gpt-5-nano")
    assert not is_reasoning_model("gpt-4.1")
    assert not is_reasoning_model("olmo-7b")


async def test_demo_model_streams_a_deterministic_reply_word_by_word() -> None:
    demo = DemoChatClient(delay_seconds=0)
    request = CompletionRequest(model="anything", messages=[ChatMessage("user", "ping")])
    first = await model_events(demo, request)
    second = await model_events(demo, request)
    assert first == second
    deltas = [event.text for event in first if isinstance(event, TextDelta)]
    assert len(deltas) > 10
    assert '"ping"' in "".join(deltas)
    last = first[-1]
    assert isinstance(last, Completion)
    assert last.finish_reason == "stop"
    assert last.model == DEMO_MODEL
    assert last.usage is not None
    assert demo.model_label("gpt-4o") == DEMO_MODEL


async def _stream_body(body: bytes) -> list[Any]:
    client = _client()
    request = CompletionRequest(model="m", messages=[ChatMessage("user", "hello")])
    with respx.mock(assert_all_called=True) as mock:
        mock.post(f"{BASE_URL}/chat/completions").mock(
            return_value=httpx.Response(
                200, content=body, headers={"content-type": "text/event-stream"}
            )
        )
        try:
            return await model_events(client, request)
        finally:
            await client.aclose()


async def test_the_event_stream_is_read_as_the_sse_format_defines_it() -> None:
    # CRLF line ends, comments, an id line, a data field split over two lines, and a last
    # event with no blank line after it: every provider's quirks seen in the wild.
    first = json.dumps(_chunk("Hel"))
    second = json.dumps(_chunk("lo", "stop"))
    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    body = (
        ": keep-alive\r\n\r\n"
        f"id: 1\r\ndata: {first}\r\n\r\n"
        f"data:{second[:20]}\ndata:{second[20:]}\n\n"
        f"data: {json.dumps({**_chunk(), 'choices': [], 'usage': usage})}"
    ).encode()
    # The split field joins with a newline, which JSON allows between tokens.
    events = await _stream_body(body)
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    completion = events[-1]
    assert isinstance(completion, Completion)
    assert completion.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 4


async def _stream_blocks(
    *bodies: list[bytes], headers: dict[str, str] | None = None
) -> list[list[Any]]:
    """The events of each body, arriving in its blocks as a socket may cut it: one request
    each, through one client."""

    async def blocks(body: list[bytes]) -> AsyncIterator[bytes]:
        for block in body:
            yield block

    answers = iter(bodies)
    client = _client()
    request = CompletionRequest(model="m", messages=[ChatMessage("user", "hello")])
    with respx.mock(assert_all_called=True) as mock:
        mock.post(f"{BASE_URL}/chat/completions").mock(
            side_effect=lambda _: httpx.Response(
                200,
                content=blocks(next(answers)),
                headers={"content-type": "text/event-stream", **(headers or {})},
            )
        )
        try:
            return [await model_events(client, request) for _ in bodies]
        finally:
            await client.aclose()


async def test_lines_read_the_same_wherever_the_network_cuts_the_body() -> None:
    # LF, CRLF and CR alone end lines; a cut may fall inside a line, between CR and LF, or
    # inside a UTF-8 character.
    first, second, third = (json.dumps(_chunk(text), ensure_ascii=False) for text in "ab€")
    body = (
        f"data: {first}\n\n: ping\r\n\r\ndata: {second}\r\n\r\ndata: {third}\r\rdata: [DONE]\n\n"
    ).encode()
    cuts = range(1, len(body))
    read = await _stream_blocks(*([body[:cut], body[cut:]] for cut in cuts))
    for cut, events in zip(cuts, read, strict=True):
        assert [e.text for e in events if isinstance(e, TextDelta)] == ["a", "b", "€"], cut
        assert isinstance(events[-1], Completion)


async def test_bytes_that_are_not_utf8_are_replaced_not_fatal() -> None:
    chunk = json.dumps(_chunk("caf-")).encode().replace(b"caf-", b"caf\xe9")  # Latin-1 é
    (events,) = await _stream_blocks([b"data: " + chunk + b"\n\ndata: [DONE]\n\n"])
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["caf\ufffd"]


async def test_a_compressed_event_stream_is_decoded() -> None:
    # Asked for nothing of the kind, a server may compress anyway.
    body = _chunk_line("Hi") + b"data: [DONE]\n\n"
    (events,) = await _stream_blocks([gzip.compress(body)], headers={"content-encoding": "gzip"})
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hi"]


async def test_a_line_that_never_ends_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_client, "MAX_LINE_BYTES", 4096)
    with pytest.raises(UpstreamError) as raised:
        await _stream_blocks([_chunk_line("Hi"), b"data: " + b"x" * 3000, b"x" * 3000])
    assert raised.value.status == 502


@pytest.mark.parametrize(
    "body",
    [
        b"data: {not json}\n\n",
        b'data: ["a list"]\n\n',
        b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
        b'event: error\ndata: {"message": "overloaded"}\n\n',
        b'data: {"error": {"message": "overloaded"}}\n\n',
    ],
    ids=["not-json", "not-an-object", "content-not-text", "error-event", "error-chunk"],
)
async def test_a_malformed_or_failing_stream_is_an_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError) as raised:
        await _stream_body(_chunk_line("Hi") + body)
    assert raised.value.status == 502


def _chunk_line(content: str) -> bytes:
    return f"data: {json.dumps(_chunk(content))}\n\n".encode()


async def test_a_finished_stream_leaves_its_connection_open_for_the_next(
    upstream: FakeUpstream,
) -> None:
    # The end of the body follows `[DONE]`: unread, it would cost a new connection (and with a
    # real provider a TLS handshake) at every turn.
    settings = Settings(
        _env_file=None,
        openai_base_url=upstream.base_url,
        openai_api_key="sk-x",
        upstream_max_retries=0,
    )
    client = OpenAIChatClient(settings)
    request = CompletionRequest(model="fake-model", messages=[ChatMessage("user", "hello")])
    try:
        for _ in range(3):
            events = await model_events(client, request)
            assert isinstance(events[-1], Completion)
    finally:
        await client.aclose()
    ports = {received.client_port for received in upstream.requests}
    assert len(upstream.requests) == 3
    assert len(ports) == 1


async def test_a_body_left_open_after_done_does_not_hold_the_reply(
    upstream: FakeUpstream,
) -> None:
    upstream.queue(Reply(tokens=["Hi"], open_after_done=True))
    settings = Settings(_env_file=None, openai_base_url=upstream.base_url, upstream_max_retries=0)
    client = OpenAIChatClient(settings)
    request = CompletionRequest(model="fake-model", messages=[ChatMessage("user", "hello")])
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT + 2):
            events = await model_events(client, request)
    finally:
        await client.aclose()
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hi"]
    assert isinstance(events[-1], Completion)


async def test_tool_calls_streamed_in_fragments_are_assembled(upstream: FakeUpstream) -> None:
    arguments = json.dumps({"title": "buy milk", "notes": "two litres, semi-skimmed"})
    upstream.queue(
        Reply(
            tokens=["Let me", " add that."],
            tool_calls=[("call_a", "add_task", arguments), ("call_b", "list_tasks", "{}")],
            fragment_size=3,
        )
    )
    settings = Settings(_env_file=None, openai_base_url=upstream.base_url, upstream_max_retries=0)
    client = OpenAIChatClient(settings)
    tools = [{"type": "function", "function": {"name": "add_task", "parameters": {}}}]
    request = CompletionRequest(
        model="fake-model", messages=[ChatMessage("user", "add milk")], tools=tools
    )
    try:
        events = await model_events(client, request)
    finally:
        await client.aclose()
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Let me", " add that."]
    completion = events[-1]
    assert isinstance(completion, Completion)
    assert completion.finish_reason == "tool_calls"
    assert completion.tool_calls == (
        ToolCall("call_a", "add_task", arguments),
        ToolCall("call_b", "list_tasks", "{}"),
    )
    assert upstream.requests[-1].body["tools"] == tools


async def test_a_tool_call_sent_whole_without_an_index_is_read_too() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    body = (
        f"data: {json.dumps({'choices': [{'delta': {'tool_calls': [call]}}]})}\n\n"
        f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'tool_calls'}]})}\n\n"
    ).encode()
    completion = (await _stream_body(body))[-1]
    assert isinstance(completion, Completion)
    assert completion.tool_calls == (ToolCall("c1", "f", '{"a": 1}'),)


@pytest.mark.parametrize(
    "fragment",
    [
        '"not a list"',
        '["not an object"]',
        '[{"index": 0, "function": {"arguments": "{}"}}]',
        '[{"index": 0, "function": {"name": 7}}]',
    ],
    ids=["not-a-list", "not-an-object", "no-name", "name-not-text"],
)
async def test_a_malformed_tool_call_is_an_upstream_error(fragment: str) -> None:
    body = f'data: {{"choices": [{{"delta": {{"tool_calls": {fragment}}}}}]}}\n\n'.encode()
    with pytest.raises(UpstreamError):
        await _stream_body(body)
