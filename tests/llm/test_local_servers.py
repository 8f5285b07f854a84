"""Against local model servers (llama.cpp's, vLLM, Ollama, LM Studio) with no context setting:
the window is asked of the server, a smaller one it names when it refuses a prompt is learned
and the call retried trimmed, usage is counted where it streams none, and tools it takes none
of are dropped for good."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import openai
import pytest

from chatbot.config import Settings
from chatbot.context.tokens import TokenCounter
from chatbot.llm.refusals import context_overflow, rejects_tools
from chatbot.llm.windows import (
    FOUND_TTL,
    MAX_NEW_MODELS_PER_MINUTE,
    MAX_PROBE_BYTES,
    ContextWindows,
    Window,
    llama_cpp_window,
    lmstudio_window,
    ollama_window,
    probes_base_url,
    vllm_window,
    window_count,
)
from tests.fake_upstream import FakeUpstream, Refusal, Reply, Route, prompt_tokens
from tests.support import Service, day_usage, eventually

MODEL = "qwen2.5-7b-instruct"
"""A model no table knows: without its server's word, it would get the 8,192 default."""
COUNTER = TokenCounter()


def _text(index: int, tokens: int) -> str:
    """A message of at least `tokens` tokens as the service counts them, unique to `index`."""
    text = f"Message {index}:"
    size = COUNTER.count_text(text, MODEL)
    word = 0
    while size < tokens:
        piece = f" w{index}x{word}"
        text += piece
        size += COUNTER.count_text(piece, MODEL)
        word += 1
    assert COUNTER.count_text(text, MODEL) >= tokens
    return text


@dataclass(frozen=True)
class Kind:
    name: str
    configure: Callable[[FakeUpstream], None]
    window: int
    source: str
    reports_usage: bool


KINDS = [
    Kind(
        "llama.cpp", lambda upstream: upstream.like_llama_cpp(2048), 2048, "server:llama.cpp", False
    ),
    Kind("vllm", lambda upstream: upstream.like_vllm(MODEL, 2048), 2048, "server:vllm", True),
    # Ollama runs its default num_ctx of 4,096, whatever the model could hold.
    Kind(
        "ollama", lambda upstream: upstream.like_ollama(MODEL, 131072), 4096, "server:ollama", True
    ),
]
SMALL = [  # the same servers, each holding 2,048 tokens
    KINDS[0],
    KINDS[1],
    Kind(
        "ollama-num-ctx",
        lambda upstream: upstream.like_ollama(MODEL, 131072, num_ctx=2048),
        2048,
        "server:ollama",
        True,
    ),
]


async def _context(service: Service, conversation_id: str) -> dict[str, Any]:
    response = await service.client.get(
        f"/v1/conversations/{conversation_id}/context", headers=service.auth()
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def _turn(service: Service, conversation_id: str, content: str) -> dict[str, Any]:
    response = await service.send(conversation_id, content)
    assert response.status_code == 201, response.text
    await service.state.chores.idle()
    reply: dict[str, Any] = response.json()["assistant_message"]
    assert reply["status"] == "completed", reply
    return reply


@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
async def test_a_long_conversation_fits_the_window_the_server_names(
    start_service: Any, upstream: FakeUpstream, kind: Kind
) -> None:
    kind.configure(upstream)
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        for index in range(20):
            reply = await _turn(service, conversation["id"], _text(index, 150))
            sent = upstream.requests[-1].body
            assert prompt_tokens(sent) <= kind.window
            assert sent["messages"][-1]["content"] == _text(index, 150)
            usage = reply["usage"]
            assert usage is not None
            assert usage["estimated"] is not kind.reports_usage
            if not kind.reports_usage:  # the planned prompt and the counted reply
                completion = COUNTER.count_text("Hello, world!", MODEL)
                assert usage == {
                    "prompt_tokens": reply["prompt_token_count"],
                    "completion_tokens": completion,
                    "total_tokens": reply["prompt_token_count"] + completion,
                    "estimated": True,
                }
        assert upstream.rejected == []
        last = json.dumps(upstream.requests[-1].body["messages"])
        assert _text(0, 150) not in last  # older turns were trimmed
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (
            kind.window,
            kind.source,
        )
        assert context["model"] == MODEL
        assert context["total_tokens"] <= context["budget"] < kind.window
        assert (await service.messages(conversation["id"]))[-1]["usage"] == reply["usage"]
        # Asked once, not at every turn.
        asked = len(upstream.probes)
        await _turn(service, conversation["id"], "one more")
        assert len(upstream.probes) == asked


@pytest.mark.parametrize("kind", SMALL, ids=[kind.name for kind in SMALL])
async def test_a_message_larger_than_the_servers_window_is_413_before_any_call(
    start_service: Any, upstream: FakeUpstream, kind: Kind
) -> None:
    kind.configure(upstream)
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        response = await service.send(conversation["id"], _text(0, 2800))
        assert response.status_code == 413, response.text
        problem = response.json()
        assert problem["code"] == "context_too_large"
        assert kind.source in problem["detail"]
        assert upstream.requests == []
        assert await service.messages(conversation["id"]) == []
        assert upstream.probes  # the server was asked, not called


async def test_probes_carry_the_api_key_and_reach_the_servers_own_routes(
    start_service: Any, upstream: FakeUpstream
) -> None:
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (8192, "default")
        asked = {(probe.path, probe.headers.get("authorization")) for probe in upstream.probes}
        bearer = "Bearer sk-test-key"
        assert asked == {
            ("/props", bearer),
            ("/v1/models", bearer),
            ("/api/show", bearer),
            ("/api/v0/models", bearer),
        }
        show = next(probe for probe in upstream.probes if probe.path == "/api/show")
        assert show.body == {"model": MODEL}
        # A server without those routes is not asked again at every turn.
        for index in range(3):
            await _turn(service, conversation["id"], f"turn {index}")
        assert len(upstream.probes) == 4


async def test_lm_studio_names_the_context_a_model_is_loaded_with(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_lmstudio(MODEL, 32768, loaded=4096)
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (
            4096,
            "server:lmstudio",
        )


async def test_the_setting_wins_over_what_the_server_says(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_llama_cpp(2048)
    async with start_service(model=MODEL, context_tokens=700) as service:
        conversation = await service.create_conversation()
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (700, "setting")
        assert context["budget"] == 700


LEARNING = [
    ("llama.cpp", lambda upstream: upstream.like_llama_cpp(2048, props_n_ctx=8192)),
    ("vllm", lambda upstream: upstream.like_vllm(MODEL, 8192, enforced=2048)),
]


@pytest.mark.parametrize(("name", "configure"), LEARNING, ids=[name for name, _ in LEARNING])
async def test_a_smaller_window_named_in_a_refusal_is_learned_and_the_call_retried_trimmed(
    start_service: Any, upstream: FakeUpstream, name: str, configure: Callable[..., None]
) -> None:
    configure(upstream)  # the server says 8,192 tokens and holds 2,048
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        before = await _context(service, conversation["id"])
        assert before["context_window"] == 8192
        turns = 0
        while not upstream.rejected:
            calls = len(upstream.requests)
            reply = await _turn(service, conversation["id"], _text(turns, 150))
            turns += 1
            assert turns < 20, "the prompt never grew past the server's window"
        # That turn took one request more: refused, then sent again trimmed, and completed.
        assert len(upstream.requests) == calls + 2
        refused, retried = upstream.requests[-2:]
        assert refused is upstream.rejected[0]
        assert prompt_tokens(refused.body) > 2048 >= prompt_tokens(retried.body)
        assert len(retried.body["messages"]) < len(refused.body["messages"])
        assert retried.body["messages"][0] == refused.body["messages"][0]  # the system prompt
        assert retried.body["messages"][-1] == refused.body["messages"][-1]  # the new message
        assert retried.body["messages"][1]["role"] == "user"  # whole turns
        assert reply["usage"] is not None
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (2048, "learned")
        # Later turns are planned with it: no refusal, one request each.
        calls = len(upstream.requests)
        await _turn(service, conversation["id"], _text(99, 150))
        assert len(upstream.requests) == calls + 1
        assert len(upstream.rejected) == 1


async def test_a_server_counting_more_tokens_than_the_service_gets_a_shorter_prompt(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_llama_cpp(2048)
    upstream.count_factor = 2.5  # its tokenizer is not o200k
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        for index in range(12):
            await _turn(service, conversation["id"], _text(index, 150))
        assert upstream.rejected  # the window it named was the one planned with...
        for refused in upstream.rejected:  # ...so each refusal was followed by a shorter prompt
            retried = upstream.requests[upstream.requests.index(refused) + 1]
            assert prompt_tokens(retried.body) < prompt_tokens(refused.body)
            assert prompt_tokens(retried.body) * 2.5 <= 2048


async def test_a_reply_asked_for_more_than_the_window_leaves_is_retried_with_what_it_leaves(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_vllm(MODEL, 8192, enforced=2048)  # vLLM counts max_tokens in
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        response = await service.send(conversation["id"], "hello", max_output_tokens=2100)
        assert response.status_code == 201, response.text
        refused, retried = upstream.requests
        assert refused is upstream.rejected[0]
        assert refused.body["max_tokens"] == 2100
        assert retried.body["messages"] == refused.body["messages"]
        assert retried.body["max_tokens"] == 2048 - prompt_tokens(retried.body)


async def test_a_refusal_that_still_does_not_fit_once_trimmed_is_context_too_large(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_vllm(MODEL, 8192, enforced=2048)
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        # Fits the 8,192 the server claims, but not the 2,048 it holds, even alone.
        response = await service.send(conversation["id"], _text(0, 2800))
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "context_too_large"
        reply = response.json()["assistant_message"]
        assert (reply["status"], reply["error"]["code"]) == ("failed", "context_too_large")
        assert len(upstream.requests) == 1  # no retry that could not fit
        await service.state.chores.idle()
        again = await service.send(conversation["id"], _text(1, 2800))
        assert again.status_code == 413  # now known before any call
        assert len(upstream.requests) == 1


REFUSING_TOOLS = [
    ("llama.cpp-without-jinja", lambda upstream: upstream.like_llama_cpp(4096, jinja=False)),
    ("vllm-without-parser", lambda upstream: upstream.like_vllm(MODEL, 4096, tools=False)),
    ("ollama-model-without-tools", lambda upstream: upstream.like_ollama(MODEL, tools=False)),
]


@pytest.mark.parametrize(
    ("name", "configure"), REFUSING_TOOLS, ids=[name for name, _ in REFUSING_TOOLS]
)
async def test_a_server_refusing_tools_is_asked_again_without_them_and_never_sent_them_again(
    start_service: Any,
    upstream: FakeUpstream,
    name: str,
    configure: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure(upstream)
    caplog.set_level("INFO", logger="chatbot.llm.openai_client")
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        first = await _turn(service, conversation["id"], "hello")
        assert first["content"] == "Hello, world!"
        refused, retried = upstream.requests
        assert "tools" in refused.body
        assert "tools" not in retried.body
        assert "tool_choice" not in retried.body
        assert retried.body["messages"] == refused.body["messages"]
        await _turn(service, conversation["id"], "and again")
        assert len(upstream.requests) == 3
        assert "tools" not in upstream.requests[-1].body
        # Not charged for definitions never sent.
        context = await _context(service, conversation["id"])
        assert (context["tools"]["offered"], context["tools"]["tokens"]) == ([], 0)
        assert context["tools"]["toolsets"]
        assert caplog.text.count("refuses tools") == 1


async def test_a_refused_tool_choice_drops_tools_for_that_call_only(
    start_service: Any, upstream: FakeUpstream
) -> None:
    # The call after the last round carries tool_choice "none"; a server refusing just that
    # gets that call without tools, and the model keeps its tools for the next turn.
    upstream.like_vllm(MODEL, 8192)
    upstream.tools_refusal = Refusal(
        400, {"object": "error", "message": "tool_choice 'none' is not supported", "code": 400}
    )
    upstream.refuses_only_tool_choice = True
    async with start_service(model=MODEL, max_tool_rounds=1) as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        upstream.queue(
            Reply(tokens=[], tool_calls=[("call_1", "list_tasks", "{}")]), Reply(tokens=["None."])
        )
        reply = await _turn(service, conversation["id"], "what is on my list?")
        assert reply["content"] == "None."
        refused, retried = upstream.requests[-2:]
        assert refused.body["tool_choice"] == "none"
        assert "tools" not in retried.body
        await _turn(service, conversation["id"], "and now?")
        assert "tools" in upstream.requests[-1].body


async def test_a_summary_appears_with_tools_offered(
    start_service: Any, upstream: FakeUpstream
) -> None:
    # Depends on chores planning a summary with the tools the turns offer (context/chores.py).
    upstream.like_llama_cpp(4096)
    upstream.utility_default = Reply(tokens=["The", " user", " counted", " words."])
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation(toolsets=["tasks"])
        for index in range(16):
            await _turn(service, conversation["id"], _text(index, 150))
            assert "tools" in upstream.requests[-1].body
        assert _text(0, 150) not in json.dumps(upstream.requests[-1].body["messages"])
        context = await _context(service, conversation["id"])
        assert context["summary"] is not None
        assert context["summary"]["content"] == "The user counted words."
        assert context["total_tokens"] <= context["budget"]


async def test_summaries_read_what_a_small_window_holds(
    start_service: Any, upstream: FakeUpstream
) -> None:
    # A long conversation held under a large window, then served by a 2,048-token llama.cpp
    # that also writes the summaries: what falls out is read a window's worth at a time,
    # where 24,000 characters in one call would be refused every time.
    upstream.default = Reply(tokens=["Noted", "."])
    async with start_service(model=MODEL, context_tokens=100_000) as service:
        conversation = await service.create_conversation(title="Long")
        for index in range(24):
            await _turn(service, conversation["id"], _text(index, 150))
    upstream.like_llama_cpp(2048)
    upstream.requests.clear()
    async with start_service(model=MODEL, utility_model=None) as service:
        await _turn(service, conversation["id"], "and now?")
        summaries = [
            request
            for request in upstream.requests
            if "Earlier summary" in request.body["messages"][-1]["content"]
        ]
        assert len(summaries) >= 3  # the backlog, a few thousand characters a call
        assert not [request for request in upstream.rejected if request in summaries]
        for request in summaries:
            assert prompt_tokens(request.body) + request.body["max_tokens"] <= 2048
        context = await _context(service, conversation["id"])
        assert context["summary"] is not None
        assert context["omitted_messages"] == 0


async def test_usage_summed_over_reported_and_unreported_calls_is_estimated(
    service: Service,
) -> None:
    conversation = await service.create_conversation(toolsets=["tasks"])
    service.upstream.queue(
        Reply(tokens=[], tool_calls=[("call_1", "list_tasks", "{}")]),  # reports usage
        Reply(tokens=["Nothing", " to", " do."], usage=False),
    )
    reply = await _turn(service, conversation["id"], "what is left?")
    usage = reply["usage"]
    assert usage["estimated"] is True
    # The first call reported 0 (it only called a tool); the second's is counted here.
    assert usage["completion_tokens"] == COUNTER.count_text("Nothing to do.", "gpt-4o-mini")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 11 + reply["prompt_token_count"]


async def test_the_day_is_charged_the_estimate_when_no_usage_is_reported(
    start_service: Any, upstream: FakeUpstream
) -> None:
    upstream.like_llama_cpp(2048)
    async with start_service(model=MODEL, daily_token_quota=100_000) as service:
        conversation = await service.create_conversation()
        reply = await _turn(service, conversation["id"], "hello")
        usage = reply["usage"]
        assert usage["estimated"] is True
        # The prompt counts against the quota as a reported usage's would, not only the reply.
        assert usage["prompt_tokens"] == reply["prompt_token_count"]
        assert await day_usage(service.state.sessionmaker, "alice") == usage["total_tokens"]


async def test_the_demo_context_report_names_the_demo_model(start_service: Any) -> None:
    async with start_service(openai_base_url=None, openai_api_key=None, demo_delay_ms=0) as service:
        conversation = await service.create_conversation()
        context = await _context(service, conversation["id"])
        assert context["model"] == "demo-offline"
        assert context["context_window_source"] == "demo"
        reply = await _turn(service, conversation["id"], "hi")
        assert reply["model"] == context["model"]
        assert service.upstream.probes == []


# --- a server that answers its probe with garbage ------------------------------------------

_PROPS = {"default_generation_settings": {"n_ctx": 2048}}
HOSTILE = {
    "not-json": Route(raw=b"<html>It works!</html>"),
    "negative": Route(body={"default_generation_settings": {"n_ctx": -2048}}),
    "zero": Route(body={"default_generation_settings": {"n_ctx": 0}, "n_ctx": 0}),
    "huge": Route(body={"default_generation_settings": {"n_ctx": 10**30}}),
    "fraction": Route(body={"default_generation_settings": {"n_ctx": 2048.5}}),
    "text": Route(body={"default_generation_settings": {"n_ctx": "2048"}}),
    "boolean": Route(body={"default_generation_settings": {"n_ctx": True}}),
    "nan": Route(raw=b'{"default_generation_settings": {"n_ctx": NaN}}'),
    "infinity": Route(raw=b'{"default_generation_settings": {"n_ctx": 1e999}}'),
    "not-an-object": Route(body=[2048]),
    "deeply-nested": Route(raw=b"[" * 100_000 + b"]" * 100_000),
    "enormous": Route(
        raw=b'{"pad": "' + b"x" * (MAX_PROBE_BYTES + 10) + b'", "n_ctx": 2048}',
    ),
    "slow": Route(body=_PROPS, delay=4.0),
    "error": Route(status=500, body=_PROPS),
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_probe_answered_with_garbage_falls_back_safely(
    start_service: Any, upstream: FakeUpstream, answer: Route
) -> None:
    upstream.routes[("GET", "/props")] = answer
    upstream.routes[("GET", "/v1/models")] = Route(
        body={"data": [{"id": MODEL, "max_model_len": answer.body}]}
    )
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        context = await _context(service, conversation["id"])
        assert (context["context_window"], context["context_window_source"]) == (8192, "default")
        await _turn(service, conversation["id"], "still answered")


# --- the rules, one by one ---------------------------------------------------------------------


def test_hosted_apis_are_never_probed_and_self_hosted_servers_are() -> None:
    for hosted in (
        "https://api.openai.com/v1",
        "https://my-resource.openai.azure.com/openai/v1",
        "https://generativelanguage.googleapis.com/v1beta/openai/",
        "https://openrouter.ai/api/v1",
        "https://API.GROQ.COM./openai/v1",
    ):
        assert not probes_base_url(hosted), hosted
    for local in (
        "http://127.0.0.1:8080/v1",
        "http://localhost:11434/v1",
        "http://vllm.internal:8000/v1",
        "https://openrouter.ai.example.net/v1",  # a name that only starts like one
        "https://notopenrouter.ai/v1",
    ):
        assert probes_base_url(local), local
    assert not probes_base_url(None)


def test_window_counts_are_whole_numbers_within_reason() -> None:
    assert [window_count(value) for value in (2048, 2048.0, 131072)] == [2048, 2048, 131072]
    for value in (None, -1, 0, 255, 2**24 + 1, 2048.5, float("nan"), "2048", True, [2048]):
        assert window_count(value) is None


def test_each_servers_answer_is_read_for_the_models_own_window() -> None:
    assert llama_cpp_window({"default_generation_settings": {"n_ctx": 4096}}) == 4096
    # A top-level total is shared by the slots; with both, the smaller.
    assert llama_cpp_window({"n_ctx": 8192, "total_slots": 4}) == 2048
    assert llama_cpp_window({"n_ctx": 8192, "default_generation_settings": {"n_ctx": 4096}}) == (
        4096
    )
    assert llama_cpp_window({"default_generation_settings": "x"}) is None
    listing = {"data": [{"id": "a", "max_model_len": 1024}, {"id": MODEL, "max_model_len": 4096}]}
    assert vllm_window(listing, MODEL) == 4096
    assert vllm_window(listing, "other") is None
    assert vllm_window({"data": [{"id": "only", "max_model_len": 1024}]}, "alias") == 1024
    assert vllm_window({"data": [{"id": MODEL, "meta": {"n_ctx_train": 1}}]}, MODEL) is None
    info = {"general.architecture": "qwen2", "qwen2.context_length": 32768}
    assert ollama_window({"model_info": info}) == 4096
    assert ollama_window({"model_info": info, "parameters": "num_ctx 16384"}) == 16384
    small = {"general.architecture": "gemma", "gemma.context_length": 2048}
    assert ollama_window({"model_info": small, "parameters": 'stop "x"'}) == 2048
    assert ollama_window({"error": "model not found"}) is None
    models = {"data": [{"id": MODEL, "max_context_length": 32768}]}
    assert lmstudio_window(models, MODEL) == 32768
    models["data"][0]["loaded_context_length"] = 8192
    assert lmstudio_window(models, MODEL) == 8192


def _refusal(status: int, body: dict[str, Any]) -> openai.APIStatusError:
    """The error the `openai` client raises for this answer: its message names the whole
    body, its `body` is what is under `error` (a plain string, for LM Studio)."""
    response = httpx2.Response(status, request=httpx2.Request("POST", "http://x/v1/chat"))
    message = f"Error code: {status} - {body}"
    return openai.APIStatusError(message, response=response, body=body.get("error", body))


@pytest.mark.parametrize(
    ("status", "body", "window"),
    [
        (400, {"error": {"message": "This model's maximum context length is 2048 tokens. "
                         "However, you requested 2900 tokens (2800 in the messages, 100 in "
                         "the completion).", "code": "context_length_exceeded"}}, 2048),
        (400, {"error": {"message": "request (2900 tokens) exceeds the available context size "
                         "(2048 tokens), try increasing it"}}, 2048),
        (400, {"error": {"message": "the request exceeds the available context size. try "
                         "increasing the context size or enable context shift",
                         "type": "exceed_context_size_error", "n_prompt_tokens": 2900,
                         "n_ctx": 2048}}, 2048),
        (500, {"error": {"message": "the request exceeds the available context size, try "
                         "increasing it"}}, None),
        (400, {"error": "However, the model is loaded with context length of only 4096 "
                        "tokens, which is not enough."}, 4096),
        (400, {"error": {"message": "Requested tokens (2285) exceed context window of 2048"}},
         2048),
        (400, {"error": {"message": "Prompt exceeds n_ctx: 2892 > 2048"}}, 2048),
    ],
    ids=["openai-vllm", "llama.cpp-message", "llama.cpp-fields", "no-number", "lm-studio",
         "llama-cpp-python", "n_ctx"],
)  # fmt: skip
def test_refusals_naming_a_context_length_are_read(
    status: int, body: dict[str, Any], window: int | None
) -> None:
    assert context_overflow(_refusal(status, body)) == (True, window)


def test_other_refusals_are_not_context_overflows() -> None:
    for status, message in [
        (400, "Invalid value for 'temperature'"),
        (400, "tools param requires --jinja flag"),
        (401, "maximum context length is 2048 tokens"),
        (429, "Rate limit reached"),
    ]:
        assert context_overflow(_refusal(status, {"error": {"message": message}})) == (
            False,
            None,
        )


@pytest.mark.parametrize(
    ("status", "message", "refused"),
    [
        (500, "tools param requires --jinja flag", True),
        (500, "Unsupported param: tools", True),
        (400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
              "to be set", True),
        (400, "registry.ollama.ai/library/gemma:2b does not support tools", True),
        (400, "Tools are not supported by this model", True),
        (400, "Invalid schema for function 'add_task': 'x' is not valid", False),
        (400, "This model's maximum context length is 2048 tokens", False),
        (429, "tools are not supported during the rate limit", False),
    ],
)  # fmt: skip
def test_refusals_of_tools_are_told_from_others(status: int, message: str, refused: bool) -> None:
    assert rejects_tools(_refusal(status, {"error": {"message": message}})) is refused


async def test_a_window_learned_wins_over_the_probe_and_only_the_setting_over_it(
    upstream: FakeUpstream,
) -> None:
    upstream.like_llama_cpp(4096)
    settings = Settings(_env_file=None, openai_base_url=upstream.base_url, model=MODEL)
    async with httpx.AsyncClient() as http:
        windows = ContextWindows(settings, http)
        assert await windows.get(MODEL) == Window(4096, "server:llama.cpp")
        assert windows.learn(MODEL, 2048) == Window(2048, "learned")
        assert await windows.get(MODEL) == Window(2048, "learned")
        assert windows.learn(MODEL, -5) is None
        assert await windows.get(MODEL) == Window(2048, "learned")
        fixed = ContextWindows(settings.model_copy(update={"context_tokens": 900}), http)
        fixed.learn(MODEL, 2048)
        assert await fixed.get(MODEL) == Window(900, "setting")
        # OpenAI's own endpoint is not probed: its models are in the table.
        hosted = ContextWindows(Settings(_env_file=None, openai_api_key="sk-x"), http)
        assert await hosted.get("gpt-4o-mini") == Window(128_000, "table")
    assert len(upstream.probes) == 4


@asynccontextmanager
async def _asking(upstream: FakeUpstream) -> AsyncIterator[tuple[ContextWindows, list[float]]]:
    """Context windows asked of `upstream`, on a clock the test moves (`now[0]`)."""
    settings = Settings(_env_file=None, openai_base_url=upstream.base_url, model=MODEL)
    now = [0.0]
    async with httpx.AsyncClient() as http:
        yield ContextWindows(settings, http, clock=lambda: now[0]), now


async def test_a_learned_window_lapses_and_a_server_without_routes_is_not_waited_for_again(
    upstream: FakeUpstream,
) -> None:
    upstream.like_llama_cpp(2048)
    async with _asking(upstream) as (windows, now):
        windows.learn(MODEL, 1024)
        assert await windows.get(MODEL) == Window(1024, "learned")
        # Restarted with a larger window: once the learned one lapses, the server is believed.
        now[0] += FOUND_TTL + 1
        assert await windows.get(MODEL) == Window(2048, "server:llama.cpp")

        # A server with none of the routes, slow to say so: only the first turn waits.
        upstream.routes.clear()
        for route in ("/props", "/v1/models", "/api/v0/models"):
            upstream.routes[("GET", route)] = Route(status=404, body={}, delay=1.0)
        other = "another-model"
        assert await windows.get(other) == Window(8192, "default")
        asked = len(upstream.probes)
        now[0] += FOUND_TTL + 1
        async with asyncio.timeout(0.5):  # answered from what is known, not after the probe
            assert await windows.get(other) == Window(8192, "default")
        await eventually(lambda: len(upstream.probes) == asked + 4)


async def test_new_model_names_are_asked_about_a_few_a_minute(upstream: FakeUpstream) -> None:
    # Model names are the client's: a stream of made-up ones must not become a stream of
    # probes to the server, nor push the real model out of the cache.
    upstream.like_llama_cpp(2048)
    async with _asking(upstream) as (windows, now):
        found = [await windows.get(f"made-up-{index}") for index in range(30)]
        assert found[:MAX_NEW_MODELS_PER_MINUTE] == [Window(2048, "server:llama.cpp")] * 8
        assert set(found[MAX_NEW_MODELS_PER_MINUTE:]) == {Window(8192, "default")}
        assert len(upstream.probes) == 4 * MAX_NEW_MODELS_PER_MINUTE
        now[0] += 60  # a minute on, there is room again
        assert await windows.get(MODEL) == Window(2048, "server:llama.cpp")


async def test_a_refusal_naming_no_window_is_retried_a_quarter_shorter(
    start_service: Any, upstream: FakeUpstream
) -> None:
    # Older llama.cpp builds: "the request exceeds the available context size" and no number.
    upstream.like_llama_cpp(2048, props_n_ctx=8192)
    upstream.overflow = lambda window, tokens: Refusal(
        400, {"error": {"code": 400, "message": "the request exceeds the available context size"}}
    )
    async with start_service(model=MODEL) as service:
        conversation = await service.create_conversation()
        turns = 0
        while not upstream.rejected:
            reply = await _turn(service, conversation["id"], _text(turns, 150))
            turns += 1
            assert turns < 20, "the prompt never grew past the server's window"
        refused, retried = upstream.requests[-2:]
        assert refused is upstream.rejected[-1]
        assert prompt_tokens(retried.body) <= prompt_tokens(refused.body) * 3 // 4
        assert retried.body["messages"][-1] == refused.body["messages"][-1]
        assert reply["status"] == "completed"


async def test_a_window_found_is_refreshed_in_the_background_and_kept_while_unanswered(
    upstream: FakeUpstream,
) -> None:
    upstream.like_llama_cpp(4096)
    async with _asking(upstream) as (windows, now):
        assert await windows.get(MODEL) == Window(4096, "server:llama.cpp")
        upstream.like_llama_cpp(8192)  # restarted with a larger context
        now[0] += FOUND_TTL + 1
        # Answered at once with what was known; the server is asked meanwhile.
        assert await windows.get(MODEL) == Window(4096, "server:llama.cpp")
        await eventually(lambda: len(upstream.probes) == 8)
        await eventually(lambda: not windows._probing)
        assert await windows.get(MODEL) == Window(8192, "server:llama.cpp")
        # A server that stops answering keeps its window.
        upstream.routes.clear()
        now[0] += FOUND_TTL + 1
        assert await windows.get(MODEL) == Window(8192, "server:llama.cpp")
        await eventually(lambda: not windows._probing)
        assert await windows.get(MODEL) == Window(8192, "server:llama.cpp")
