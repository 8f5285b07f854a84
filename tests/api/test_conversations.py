"""Conversations and messages as resources: CRUD, paging, and bad input answered with problems."""

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text, update

from chatbot.messages.models import Message
from tests.support import Service


async def test_create_read_update_delete(service: Service) -> None:
    created = await service.create_conversation(
        title="Trip", model="gpt-4o", system_prompt="Be brief.", metadata={"tags": ["travel"]}
    )
    assert created["title"] == "Trip"
    assert created["message_count"] == 0
    assert created["created_at"].endswith("Z") or "+" in created["created_at"]
    url = f"/v1/conversations/{created['id']}"

    fetched = await service.client.get(url, headers=service.auth())
    assert fetched.json() == created

    patched = await service.client.patch(
        url, json={"title": "Trip to Lisbon", "system_prompt": None}, headers=service.auth()
    )
    assert patched.status_code == 200
    assert patched.json()["title"] == "Trip to Lisbon"
    assert patched.json()["system_prompt"] is None
    assert patched.json()["model"] == "gpt-4o"  # untouched: absent from the body
    assert patched.json()["updated_at"] > created["updated_at"]

    await service.send(created["id"], "hi")
    deleted = await service.client.delete(url, headers=service.auth())
    assert deleted.status_code == 204
    assert (await service.client.get(url, headers=service.auth())).status_code == 404
    gone = await service.client.get(f"{url}/messages", headers=service.auth())
    assert gone.status_code == 404
    again = await service.client.delete(url, headers=service.auth())
    assert again.status_code == 404


async def test_deleting_a_conversation_deletes_its_messages(service: Service) -> None:
    conversation = await service.create_conversation()
    url = f"/v1/conversations/{conversation['id']}"
    await service.send(conversation["id"], "hi")
    await service.client.delete(url, headers=service.auth())
    engine = service.state.engine
    async with engine.connect() as connection:
        remaining = await connection.scalar(text("SELECT count(*) FROM messages"))
    assert remaining == 0


async def test_conversations_list_most_recent_activity_first(service: Service) -> None:
    first = await service.create_conversation(title="first")
    second = await service.create_conversation(title="second")
    third = await service.create_conversation(title="third")
    # A new message makes the first conversation the most recent.
    await service.send(first["id"], "hi")
    listing = (await service.client.get("/v1/conversations", headers=service.auth())).json()
    assert [item["id"] for item in listing["data"]] == [first["id"], third["id"], second["id"]]


async def test_cursor_pages_stay_correct_while_rows_are_inserted(service: Service) -> None:
    created = [await service.create_conversation(title=f"c{index}") for index in range(7)]
    seen: list[str] = []
    response = await service.client.get(
        "/v1/conversations", params={"limit": 3}, headers=service.auth()
    )
    page = response.json()
    seen += [item["id"] for item in page["data"]]
    # Rows inserted while paging go to the top and never shift the pages after the cursor.
    await service.create_conversation(title="late arrival")
    while page["next_cursor"]:
        response = await service.client.get(
            "/v1/conversations",
            params={"limit": 3, "cursor": page["next_cursor"]},
            headers=service.auth(),
        )
        page = response.json()
        seen += [item["id"] for item in page["data"]]
    assert seen == [conversation["id"] for conversation in reversed(created)]


async def test_messages_are_paged_oldest_first(service: Service) -> None:
    conversation = await service.create_conversation()
    url = f"/v1/conversations/{conversation['id']}/messages"
    for index in range(3):
        await service.send(conversation["id"], f"q{index}")
    contents: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await service.client.get(url, params=params, headers=service.auth())).json()
        assert len(page["data"]) <= 2
        contents += [message["content"] for message in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    answer = "Hello, world!"
    assert contents == ["q0", answer, "q1", answer, "q2", answer]


async def test_message_order_never_depends_on_the_clock(service: Service) -> None:
    conversation = await service.create_conversation()
    for index in range(3):
        await service.send(conversation["id"], f"q{index}")
    # Give every message the same timestamp, then timestamps running backwards.
    engine = service.state.engine
    async with engine.begin() as connection:
        await connection.execute(
            update(Message).values(created_at=datetime(2030, 1, 1, tzinfo=UTC))
        )
    expected = ["q0", "Hello, world!", "q1", "Hello, world!", "q2", "Hello, world!"]
    assert [m["content"] for m in await service.messages(conversation["id"])] == expected
    async with engine.begin() as connection:
        await connection.execute(
            update(Message)
            .where(Message.content == "q2")
            .values(created_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    assert [m["content"] for m in await service.messages(conversation["id"])] == expected
    await service.send(conversation["id"], "q3")
    sent = service.upstream.requests[-1].body["messages"]
    assert [m["content"] for m in sent[1:]] == [*expected, "q3"]


async def test_every_response_carries_a_request_id(service: Service) -> None:
    echoed = await service.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await service.client.get("/v1/conversations/nope", headers=service.auth())
    assert len(generated.headers["x-request-id"]) == 32
    hostile = await service.client.get("/healthz", headers={"X-Request-ID": "a b\tc" * 100})
    assert hostile.headers["x-request-id"] != "a b\tc" * 100


ZERO = "00000000-0000-0000-0000-000000000000"


def _cursor(position: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


BAD_CONVERSATIONS: dict[str, tuple[Any, int, str]] = {
    "malformed JSON": ("{not json", 400, "invalid_json"),
    "not an object": ("[1, 2]", 400, "invalid_body"),
    "unknown field": ({"title": "x", "owner": "mallory"}, 422, "validation_error"),
    "NUL in title": ({"title": "a\x00b"}, 422, "validation_error"),
    "NUL in metadata": ({"metadata": {"k": "a\x00b"}}, 422, "validation_error"),
    "huge metadata": ({"metadata": {"k": "x" * 20_000}}, 422, "validation_error"),
    "long title": ({"title": "x" * 501}, 422, "validation_error"),
    "bad model name": ({"model": "gpt 4; drop table"}, 422, "validation_error"),
    "non-ASCII model name": ({"model": "llama\u00e6"}, 422, "validation_error"),
    "wrong type": ({"title": 5}, 422, "validation_error"),
}


@pytest.mark.parametrize(
    ("body", "status", "code"), BAD_CONVERSATIONS.values(), ids=BAD_CONVERSATIONS.keys()
)
async def test_bad_conversation_bodies_get_problem_documents(
    service: Service, body: Any, status: int, code: str
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    response = await service.client.post(
        "/v1/conversations",
        headers={**service.auth(), "Content-Type": "application/json"},
        **kwargs,
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    if status == 422:
        assert problem["errors"][0]["loc"][0] == "body"
        assert "input" not in problem["errors"][0]


BAD_MESSAGES: dict[str, tuple[dict[str, Any], str]] = {
    "empty content": ({"content": ""}, "validation_error"),
    "blank content": ({"content": "   \n"}, "validation_error"),
    "missing content": ({}, "validation_error"),
    "NUL byte": ({"content": "hi\x00there"}, "validation_error"),
    "oversized content": ({"content": "x" * 40_000}, "content_too_long"),
    "temperature too high": ({"content": "hi", "temperature": 3}, "validation_error"),
    "negative max tokens": ({"content": "hi", "max_output_tokens": -1}, "validation_error"),
    "max tokens over cap": ({"content": "hi", "max_output_tokens": 10**6}, "validation_error"),
    "unknown field": ({"content": "hi", "role": "system"}, "validation_error"),
}


@pytest.mark.parametrize(("body", "code"), BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
async def test_bad_messages_are_422_and_never_reach_the_model(
    service: Service, body: dict[str, Any], code: str
) -> None:
    conversation = await service.create_conversation()
    response = await service.client.post(
        f"/v1/conversations/{conversation['id']}/messages", json=body, headers=service.auth()
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert service.upstream.requests == []
    assert await service.messages(conversation["id"]) == []


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/v1/conversations/not-a-uuid", {}, 404),
        ("/v1/conversations/not-a-uuid/messages", {}, 404),
        ("/v1/conversations", {"limit": 0}, 422),
        ("/v1/conversations", {"limit": 101}, 422),
        ("/v1/conversations", {"limit": "ten"}, 422),
        ("/v1/conversations", {"cursor": "garbage!"}, 400),
        ("/v1/conversations", {"cursor": "eyJ4IjogMX0"}, 400),
        ("/v1/conversations", {"cursor": _cursor({"u": "2024-01-01T00:00:00", "i": ZERO})}, 400),
        (
            "/v1/conversations",
            {"cursor": _cursor({"u": "0001-01-01T00:00:00+05:00", "i": ZERO})},
            400,
        ),
        ("/v1/conversations/{id}/messages", {"cursor": _cursor({"s": 2**40})}, 400),
        ("/v1/conversations/{id}/messages", {"cursor": _cursor({"s": 2**70})}, 400),
        ("/v1/nowhere", {}, 404),
    ],
)
async def test_bad_ids_and_paging_parameters(
    service: Service, path: str, params: dict[str, Any], status: int
) -> None:
    conversation = await service.create_conversation()
    response = await service.client.get(
        path.format(id=conversation["id"]), params=params, headers=service.auth()
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


async def test_wrong_method_is_a_problem_document(service: Service) -> None:
    response = await service.client.put("/v1/conversations", headers=service.auth())
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
