"""Each way the model can fail leaves the user message and a reply row with a final status."""

import logging
from typing import Any

import pytest

from chatbot.context.tokens import TokenCounter
from chatbot.llm.openai_client import redacted, shareable
from tests.fake_upstream import Reply
from tests.support import Service, collect_events, day_usage

COUNTER = TokenCounter()

QUESTION = "Are you there?"


async def _assert_stored(
    service: Service, conversation_id: str, *, status: str, content: str, code: str
) -> dict[str, Any]:
    messages = await service.messages(conversation_id)
    assert [message["role"] for message in messages] == ["user", "assistant"]
    assert messages[0]["content"] == QUESTION
    assert messages[0]["status"] == "completed"
    reply = messages[1]
    assert reply["status"] == status
    assert reply["content"] == content
    assert reply["error"]["code"] == code
    assert reply["latency_ms"] is not None
    # The conversation is free for the next turn.
    service.upstream.queue(Reply())
    again = await service.send(conversation_id, QUESTION)
    assert again.status_code == 201, again.text
    return reply


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(status=500), 502, "upstream_error"),
        (Reply(status=503), 502, "upstream_error"),
        (Reply(status=401), 502, "upstream_auth_failed"),
        (Reply(status=400), 502, "upstream_rejected"),
        (Reply(status=404), 502, "upstream_rejected"),
        (Reply(tokens=[]), 502, "empty_reply"),
    ],
    ids=["500", "503", "401", "400", "404", "empty"],
)
async def test_failure_before_any_content_stores_a_failed_reply(
    service: Service, reply: Reply, status: int, code: str
) -> None:
    conversation = await service.create_conversation()
    # An empty reply is asked for twice before it counts as failed.
    service.upstream.queue(*([reply, reply] if not reply.tokens else [reply]))
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["assistant_message"]["status"] == "failed"
    assert "sk-test-key" not in response.text
    await _assert_stored(service, conversation["id"], status="failed", content="", code=code)


async def test_rate_limit_is_429_with_retry_after(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(status=429, headers={"Retry-After": "7"}))
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["code"] == "upstream_rate_limited"
    await _assert_stored(
        service, conversation["id"], status="failed", content="", code="upstream_rate_limited"
    )


async def test_model_rejection_shows_the_upstream_reason(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(
        Reply(status=400, error={"error": {"message": "model 'nope' does not exist"}})
    )
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == 502
    assert "model 'nope' does not exist" in response.json()["detail"]


async def test_unreachable_upstream_is_503(start_service: Any) -> None:
    async with start_service(openai_base_url="http://127.0.0.1:9/v1") as service:
        conversation = await service.create_conversation()
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 503
        assert response.json()["code"] == "upstream_unavailable"
        messages = await service.messages(conversation["id"])
        assert [message["status"] for message in messages] == ["completed", "failed"]


async def test_upstream_silent_before_first_token_is_504(start_service: Any) -> None:
    async with start_service(upstream_timeout=0.5) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(first_token_delay=3))
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 504
        assert response.json()["code"] == "upstream_timeout"
        await _assert_stored(
            service, conversation["id"], status="failed", content="", code="upstream_timeout"
        )


async def test_upstream_hanging_mid_reply_keeps_the_partial_reply(start_service: Any) -> None:
    async with start_service(upstream_timeout=0.5) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=["Par", "tial", " never"], hang_after=2))
        async with service.client.stream(
            "POST",
            f"/v1/conversations/{conversation['id']}/messages?stream=true",
            json={"content": QUESTION},
            headers=service.auth(),
        ) as response:
            events = await collect_events(response)
        assert [event.event for event in events] == ["start", "delta", "delta", "error"]
        error = events[-1].data
        assert error["code"] == "upstream_timeout"
        assert error["status"] == 504
        assert error["assistant_message_id"] == events[0].data["assistant_message"]["id"]
        await _assert_stored(
            service,
            conversation["id"],
            status="incomplete",
            content="Partial",
            code="upstream_timeout",
        )


async def test_connection_dropped_mid_reply_keeps_the_partial_reply(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["Half", " a", " reply"], drop_after=2))
    async with service.client.stream(
        "POST",
        f"/v1/conversations/{conversation['id']}/messages?stream=true",
        json={"content": QUESTION},
        headers=service.auth(),
    ) as response:
        events = await collect_events(response)
    assert [event.event for event in events] == ["start", "delta", "delta", "error"]
    assert events[-1].data["code"] == "upstream_disconnected"
    await _assert_stored(
        service,
        conversation["id"],
        status="incomplete",
        content="Half a",
        code="upstream_disconnected",
    )


async def test_a_call_cut_off_mid_reply_is_charged_its_prompt_and_text_as_counted(
    start_service: Any,
) -> None:
    # Providers bill a stream that produced text before it broke: so does the user's day.
    async with start_service(daily_token_quota=100_000) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=["Half", " a", " reply"], drop_after=2))
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 502
        reply = response.json()["assistant_message"]
        assert (reply["status"], reply["content"]) == ("incomplete", "Half a")
        usage = reply["usage"]
        assert usage == {
            "prompt_tokens": reply["prompt_token_count"],
            "completion_tokens": COUNTER.count_text("Half a", "gpt-4o-mini"),
            "total_tokens": reply["prompt_token_count"] + usage["completion_tokens"],
            "estimated": True,
        }
        assert await day_usage(service.state.sessionmaker, "alice") == usage["total_tokens"]
        # A call refused before any text is not charged at all.
        service.upstream.queue(Reply(status=503))
        refused = await service.send(conversation["id"], QUESTION)
        assert refused.json()["assistant_message"]["usage"] is None
        assert await day_usage(service.state.sessionmaker, "alice") == usage["total_tokens"]


async def test_garbage_from_the_upstream_is_a_clean_error(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=["Fine", " then"], garbage_after=1))
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == 502
    reply = await _assert_stored(
        service, conversation["id"], status="incomplete", content="Fine", code="upstream_error"
    )
    assert reply["finish_reason"] is None


async def test_reply_deadline_stops_a_slow_reply(start_service: Any) -> None:
    async with start_service(request_timeout=0.5) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(tokens=["slow"] * 50, token_delay=0.1))
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 504
        assert response.json()["code"] == "reply_timeout"
        reply = (await service.messages(conversation["id"]))[1]
        assert reply["status"] == "incomplete"
        assert reply["content"].startswith("slow")


async def test_retries_before_the_first_token_are_invisible(start_service: Any) -> None:
    async with start_service(upstream_max_retries=2) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(status=503, headers={"Retry-After": "0"}), Reply())
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 201
        assert response.json()["assistant_message"]["content"] == "Hello, world!"
        assert len(service.upstream.requests) == 2


async def test_one_empty_reply_is_retried_once(service: Service) -> None:
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(tokens=[]), Reply(tokens=["Second", " try"]))
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == 201
    assert response.json()["assistant_message"]["content"] == "Second try"
    assert len(service.upstream.requests) == 2


async def test_a_429_with_retry_after_is_retried_before_the_first_token(
    start_service: Any,
) -> None:
    async with start_service(upstream_max_retries=2) as service:
        conversation = await service.create_conversation()
        service.upstream.queue(Reply(status=429, headers={"Retry-After": "1"}), Reply())
        response = await service.send(conversation["id"], QUESTION)
        assert response.status_code == 201
        assert len(service.upstream.requests) == 2


async def test_a_provider_message_with_a_key_or_a_host_stays_out_of_the_answer(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="chatbot.llm.openai_client")
    secret = "sk-live-4f9a8b7c6d5e4f3a2b1c"
    said = f"Key {secret} is not valid for http://10.1.2.3:8080/v1 (gateway llm-gw.internal.corp)"
    conversation = await service.create_conversation()
    service.upstream.queue(
        Reply(status=400, error={"error": {"message": said, "type": "invalid_request_error"}})
    )
    response = await service.send(conversation["id"], QUESTION)
    assert response.status_code == 502
    detail = response.json()["detail"]
    # The status and the provider's kind of error; its message only were it shareable.
    assert detail == ("The model provider rejected the request (status 400 invalid_request_error)")
    stored = (await service.messages(conversation["id"]))[-1]
    assert stored["error"]["detail"] == detail
    # The log has the message, with what the rule objects to redacted.
    assert "is not valid for [redacted]" in caplog.text
    for leak in (secret, "10.1.2.3", "llm-gw.internal.corp"):
        assert leak not in caplog.text
        assert leak not in response.text


@pytest.mark.parametrize(
    ("message", "shared"),
    [
        ("model 'gpt-4.1' does not exist", True),
        ("This model's maximum context length is 8192 tokens.", True),
        ("llama3.1:8b not found, try pulling it first", True),
        ("Incorrect API key provided: sk-proj-abc123def456.", False),
        ("API key=abcdefgh12345678 is not valid", False),
        ("Authorization: Bearer abcdefgh1234 rejected", False),
        ("password: hunter2 expired", False),
        ("upstream at localhost refused", False),
        ("Connection to my-db failed on port 5432", False),
        ("see https://docs.example.com/errors", False),
        ("gateway llm-gw.internal.corp answered 502", False),
        ("x" * 301, False),
    ],
)
def test_the_rule_for_what_a_provider_says_reaching_clients(message: str, shared: bool) -> None:
    assert shareable(message) is shared


def test_a_huge_provider_message_is_cut_before_it_is_redacted() -> None:
    logged = redacted("f" * 1_000_000 + "\n" + "0:" * 100_000)
    assert len(logged) <= 2_000
    assert "\n" not in logged
