"""Safe to expose: isolation walked over the whole schema, limits and quotas, hostile input."""

import asyncio
import contextlib
import json
import logging
import os
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis_client

from chatbot import db
from chatbot.cli import RedactTokens
from chatbot.quotas.service import FixedWindows
from tests.fake_upstream import FakeUpstream, Reply
from tests.support import Service, TcpProxy, day_usage, eventually

PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/conversations"): {"title": "x"},
    ("PATCH", "/v1/conversations/{conversation_id}"): {"title": "stolen"},
    ("POST", "/v1/conversations/{conversation_id}/messages"): {"content": "hi"},
    ("POST", "/v1/chat"): {"message": "hi"},
}
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/v1/conversations/{conversation_id}/stream"): {"content": "hi"},
}


async def _alice_ids(service: Service) -> dict[str, str]:
    conversation = await service.create_conversation("alice", title="private")
    response = await service.send(conversation["id"], "my secret", user="alice")
    return {
        "conversation_id": conversation["id"],
        "message_id": response.json()["assistant_message"]["id"],
    }


def _operations(schema: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        for method in item
        if method in ("get", "post", "patch", "put", "delete")
    ]


async def test_every_route_in_the_schema_hides_other_users_data(service: Service) -> None:
    ids = await _alice_ids(service)
    schema = (await service.client.get("/openapi.json")).json()
    operations = _operations(schema)
    assert len(operations) >= 15
    requests_before = len(service.upstream.requests)
    for method, path in operations:
        if (method, path) in PUBLIC:
            continue
        url = path.format(**ids)
        kwargs: dict[str, Any] = {"params": QUERIES.get((method, path), {})}
        if (method, path) in BODIES:
            kwargs["json"] = BODIES[(method, path)]
        anonymous = await service.client.request(method, url, **kwargs)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        response = await service.client.request(
            method, url, headers=service.auth("mallory"), **kwargs
        )
        if "{" in path:
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["code"].endswith("_not_found")
        else:
            assert response.status_code < 500, (method, path)
            assert ids["conversation_id"] not in response.text
    # Mallory's calls never reached Alice's conversation or sent her messages anywhere.
    assert all(
        "my secret" not in json.dumps(request.body)
        for request in service.upstream.requests[requests_before:]
    )
    alice = await service.messages(ids["conversation_id"], "alice")
    assert alice[0]["content"] == "my secret"
    assert len(alice) == 2


@pytest.mark.parametrize(
    "field",
    [{"user_id": "mallory"}, {"role": "system"}, {"status": "completed"}, {"usage": {}}],
    ids=["owner", "role", "status", "usage"],
)
async def test_request_bodies_cannot_set_server_owned_fields(
    service: Service, field: dict[str, Any]
) -> None:
    conversation = await service.create_conversation()
    for url, body in (
        ("/v1/conversations", {"title": "x"}),
        (f"/v1/conversations/{conversation['id']}/messages", {"content": "hi"}),
        ("/v1/chat", {"message": "hi"}),
    ):
        response = await service.client.post(url, json=body | field, headers=service.auth())
        assert response.status_code == 422, (url, response.text)
    patch = await service.client.patch(
        f"/v1/conversations/{conversation['id']}", json=field, headers=service.auth()
    )
    assert patch.status_code == 422


async def test_request_rate_is_limited_per_user(start_service: Any) -> None:
    async with start_service(rate_limit="3/minute") as service:
        for _ in range(3):
            ok = await service.client.get("/v1/conversations", headers=service.auth("alice"))
            assert ok.status_code == 200
        limited = await service.client.get("/v1/conversations", headers=service.auth("alice"))
        assert limited.status_code == 429
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        other = await service.client.get("/v1/conversations", headers=service.auth("bob"))
        assert other.status_code == 200
        assert (await service.client.get("/healthz")).status_code == 200


def test_fixed_windows_open_per_user_and_forget_closed_ones() -> None:
    now = [1000.0]
    windows = FixedWindows(3, 60, clock=lambda: now[0])
    assert [windows.hit("alice") for _ in range(3)] == [None, None, None]
    now[0] += 10
    assert windows.hit("alice") == pytest.approx(50)
    assert [windows.hit("bob") for _ in range(3)] == [None, None, None]  # his own window
    now[0] += 50  # alice's window closes: a new one opens with her next request
    assert windows.hit("alice") is None
    assert windows.hit("bob") == pytest.approx(10)  # his closes ten seconds later
    # A thousand users come and go: two periods on, none of their windows is kept.
    for index in range(1000):
        windows.hit(f"user-{index}")
    now[0] += 130
    windows.hit("carol")
    assert len(windows._current) + len(windows._previous) == 1


async def _redis_available() -> bool:
    client = redis_client.Redis(host="127.0.0.1", port=6379)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def test_the_rate_limit_holds_across_instances_with_redis(start_service: Any) -> None:
    if not await _redis_available():
        if os.environ.get("CHATBOT_REQUIRE_POSTGRES"):
            pytest.fail("Redis is required in CI")
        pytest.skip("no Redis on 127.0.0.1:6379")
    user = f"user-{uuid.uuid4()}"
    settings = {"rate_limit": "4/minute", "redis_url": "redis://127.0.0.1:6379/0"}
    async with start_service(**settings) as first, start_service(**settings) as second:
        statuses = []
        for instance in (first, second, first, second, first, second):
            response = await instance.client.get("/v1/conversations", headers=first.auth(user))
            statuses.append(response.status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]


async def test_concurrent_replies_are_capped_per_user(start_service: Any) -> None:
    async with start_service(max_concurrent_replies=2) as service:
        gate = asyncio.Event()
        service.upstream.default = Reply(gate=gate)
        conversations = [await service.create_conversation() for _ in range(3)]
        for conversation in conversations[:2]:
            started = await service.send(conversation["id"], "hold", background=True)
            assert started.status_code == 202
        third = await service.send(conversations[2]["id"], "one too many")
        assert third.status_code == 429
        assert third.json()["code"] == "too_many_replies"
        assert third.headers["retry-after"]
        assert await service.messages(conversations[2]["id"]) == []
        # A turn that starts its own conversation is held to the same cap, and leaves nothing.
        fresh = await service.client.post(
            "/v1/chat", json={"message": "a new one"}, headers=service.auth()
        )
        assert fresh.status_code == 429
        assert fresh.json()["code"] == "too_many_replies"
        listed = await service.client.get("/v1/conversations", headers=service.auth())
        assert len(listed.json()["data"]) == 3
        other_user = await service.create_conversation("bob")
        bob = await service.send(other_user["id"], "mine", user="bob", background=True)
        assert bob.status_code == 202
        gate.set()


async def test_the_daily_token_quota_is_checked_before_the_model_is_called(
    start_service: Any,
) -> None:
    async with start_service(daily_token_quota=60) as service:
        conversation = await service.create_conversation()
        first = await service.send(conversation["id"], "hi")
        assert first.status_code == 201  # the fake upstream reports 15 tokens of usage
        second = await service.send(conversation["id"], "word " * 30)
        assert second.status_code == 429
        assert second.json()["code"] == "quota_exceeded"
        assert int(second.headers["retry-after"]) <= 86_400
        assert len(service.upstream.requests) == 1
        assert len(await service.messages(conversation["id"])) == 2


async def test_a_call_carries_max_tokens_where_the_quota_bounds_it(start_service: Any) -> None:
    async with start_service(daily_token_quota=100_000) as service:
        conversation = await service.create_conversation()
        assert (await service.send(conversation["id"], "hi")).status_code == 201
        # Room for all the reply may be: nothing the client did not ask for is sent.
        assert "max_tokens" not in service.upstream.requests[-1].body
    async with start_service(daily_token_quota=200) as service:
        conversation = await service.create_conversation("bob")
        reply = (await service.send(conversation["id"], "hi", user="bob")).json()
        prompt = reply["assistant_message"]["prompt_token_count"]
        assert service.upstream.requests[-1].body["max_tokens"] == 200 - prompt
    async with start_service(daily_token_quota=40) as service:
        conversation = await service.create_conversation("carol")
        # Room for the prompt, not for a reply worth the call: refused, nothing sent.
        refused = await service.send(conversation["id"], "word " * 15, user="carol")
        assert refused.status_code == 429
        assert refused.json()["code"] == "quota_exceeded"
        assert len(service.upstream.requests) == 2


async def test_bodies_over_the_limit_are_413(start_service: Any) -> None:
    async with start_service(max_body_bytes=4096) as service:
        declared = await service.client.post(
            "/v1/conversations", json={"title": "x" * 10_000}, headers=service.auth()
        )
        assert declared.status_code == 413
        assert declared.json()["code"] == "payload_too_large"

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1000
            yield b"{}"

        streamed = await service.client.post(
            "/v1/conversations",
            content=chunks(),
            headers={**service.auth(), "Content-Type": "application/json"},
        )
        assert streamed.status_code == 413


async def _raw_post(service: Service, body: bytes, content_type: str) -> httpx.Response:
    return await service.client.post(
        "/v1/conversations",
        content=body,
        headers={**service.auth(), "Content-Type": content_type},
    )


HOSTILE: dict[str, tuple[bytes, str]] = {
    "invalid UTF-8": (b'{"title": "\xff\xfe bad"}', "application/json"),
    "lone surrogate": (b'{"title": "\\ud800"}', "application/json"),
    "deep nesting": (
        b'{"metadata": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        "application/json",
    ),
    "nested metadata": (
        json.dumps({"metadata": {"a": [[[[[[[[[[1]]]]]]]]]]}}).encode(),
        "application/json",
    ),
    "wrong content type": (b'{"title": "x"}', "text/plain"),
    "form body": (b"title=x", "application/x-www-form-urlencoded"),
    "NUL in JSON": (b'{"title": "a\\u0000b"}', "application/json"),
}


@pytest.mark.parametrize(("body", "content_type"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_bodies_get_4xx_problem_documents(
    start_service: Any, body: bytes, content_type: str
) -> None:
    async with start_service(max_body_bytes=1_000_000) as service:
        response = await _raw_post(service, body, content_type)
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"] == "application/problem+json"
        listing = await service.client.get("/v1/conversations", headers=service.auth())
        assert listing.json()["data"] == []


async def test_security_headers_and_no_cors_by_default(service: Service) -> None:
    response = await service.client.get(
        "/v1/conversations", headers={**service.auth(), "Origin": "https://evil.example"}
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "access-control-allow-origin" not in response.headers
    preflight = await service.client.options(
        "/v1/conversations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_origins_and_docs_come_from_settings(start_service: Any) -> None:
    async with start_service(cors_origins=["https://app.example"], docs=False) as service:
        preflight = await service.client.options(
            "/v1/conversations",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = await service.client.options(
            "/v1/conversations",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        assert (await service.client.get("/docs")).status_code == 404
        assert (await service.client.get("/openapi.json")).status_code == 404


async def test_no_token_or_key_reaches_the_logs(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = service.auth()["Authorization"].removeprefix("Bearer ")
    conversation = await service.create_conversation()
    service.upstream.queue(Reply(status=401, error={"error": {"message": "bad key sk-test-key"}}))
    await service.send(conversation["id"], "hi")
    await service.client.get("/v1/conversations", headers={"Authorization": "Bearer forged.jwt.x"})
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert token not in logged
    assert "sk-test-key" not in logged

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s"',
        (
            "1.2.3.4",
            "GET",
            f"/v1/messages/x/stream?token={token}&access_token={token}&content=secret",
        ),
        None,
    )
    RedactTokens().filter(record)
    assert token not in record.getMessage()
    assert "secret" not in record.getMessage()


async def test_the_service_survives_a_database_restart(
    database_url: str, start_service: Any
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a server restart is a PostgreSQL matter")
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    proxy = await TcpProxy("127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    async with start_service(database_url=proxied) as service:
        conversation = await service.create_conversation()
        await proxy.refuse()
        outage = await service.client.get("/v1/conversations", headers=service.auth())
        assert outage.status_code == 503
        assert outage.json()["code"] == "database_unavailable"
        assert outage.headers["content-type"] == "application/problem+json"
        assert (await service.client.get("/readyz")).status_code == 503
        send = await service.send(conversation["id"], "during the outage")
        assert send.status_code == 503
        await proxy.start()
        await eventually(lambda: True)
        back = await service.client.get("/v1/conversations", headers=service.auth())
        assert back.status_code == 200
        assert [item["id"] for item in back.json()["data"]] == [conversation["id"]]
        turn = await service.send(conversation["id"], "after")
        assert turn.status_code == 201
    with contextlib.suppress(Exception):
        await proxy.stop()


async def test_only_idle_connections_are_pinged_and_a_dead_one_is_replaced(
    database_url: str, start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a server ending sessions is a PostgreSQL matter")
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.5)
    async with start_service(database_url=database_url) as service:
        dialect = service.state.engine.dialect
        pings = 0
        ping = dialect.do_ping

        def counted(connection: Any) -> bool:
            nonlocal pings
            pings += 1
            return bool(ping(connection))

        monkeypatch.setattr(dialect, "do_ping", counted)
        conversation = await service.create_conversation()
        for _ in range(5):  # in steady use: no round trips spent on pings
            response = await service.client.get("/v1/conversations", headers=service.auth())
            assert response.status_code == 200
        assert pings == 0
        # Idle, then the server ends every session of the service (a restart, a proxy's
        # timeout): the next request pings, finds the connection gone and takes a new one.
        await asyncio.sleep(0.6)
        connection = await asyncpg.connect(
            database_url.replace("postgresql+asyncpg://", "postgresql://")
        )
        try:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await connection.close()
        back = await service.client.get("/v1/conversations", headers=service.auth())
        assert back.status_code == 200, back.text
        assert [item["id"] for item in back.json()["data"]] == [conversation["id"]]
        assert pings >= 1


async def test_a_repeated_query_parameter_is_refused(service: Service) -> None:
    conversation = await service.create_conversation()
    response = await service.client.get(
        f"/v1/conversations/{conversation['id']}/messages?limit=5&limit=500",
        headers=service.auth(),
    )
    assert response.status_code == 400
    assert response.json()["code"] == "repeated_parameter"
    assert "limit" in response.json()["detail"]


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_non_finite_numbers_are_422_and_nothing_is_stored_or_logged(
    service: Service, caplog: pytest.LogCaptureFixture, number: str
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await service.create_conversation(title="kept")
    secret = "my private system prompt"
    headers = service.auth() | {"Content-Type": "application/json"}
    attempts = [
        ("POST", "/v1/conversations", f'{{"title": "{secret}", "metadata": {{"a": {number}}}}}'),
        ("PATCH", f"/v1/conversations/{created['id']}", f'{{"metadata": {{"a": [{number}]}}}}'),
        ("POST", "/v1/chat", f'{{"message": "{secret}", "metadata": {{"a": {number}}}}}'),
        (
            "POST",
            f"/v1/conversations/{created['id']}/messages",
            f'{{"content": "{secret}", "temperature": {number}}}',
        ),
    ]
    for method, path, body in attempts:
        response = await service.client.request(method, path, content=body, headers=headers)
        assert response.status_code == 422, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert secret not in response.text
    listing = await service.client.get("/v1/conversations", headers=service.auth())
    assert [each["title"] for each in listing.json()["data"]] == ["kept"]
    assert listing.json()["data"][0]["metadata"] == {}
    assert len(service.upstream.requests) == 0
    assert secret not in caplog.text


_SEED_CONVERSATIONS = {
    "postgresql": (
        "INSERT INTO conversations (id, user_id, metadata, message_count, created_at, updated_at)"
        " SELECT gen_random_uuid(), 'heavy', '{}'::jsonb, 0, now(), now()"
        " FROM generate_series(1, :count)"
    ),
    "sqlite": (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)"
        " INSERT INTO conversations (id, user_id, metadata, message_count, created_at,"
        " updated_at) SELECT lower(hex(randomblob(16))), 'heavy', '{}', 0,"
        " '2026-01-01 00:00:00', '2026-01-01 00:00:00' FROM n"
    ),
}


async def test_counting_a_users_running_replies_reads_only_their_running_ones(
    sessionmaker: Any,
) -> None:
    """The cap's count (and the quota's reservations) at 10 or 300,000 conversations: the
    partial index holds only conversations with a reply under way."""
    from sqlalchemy import text

    from chatbot.conversations.repository import running_replies_of

    async with sessionmaker() as session:
        dialect = session.get_bind().dialect
        await session.execute(text(_SEED_CONVERSATIONS[dialect.name]), {"count": 50_000})
        await session.commit()
        await session.execute(text("ANALYZE"))
        counted = running_replies_of("heavy").compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}
        )
        explain = "EXPLAIN QUERY PLAN" if dialect.name == "sqlite" else "EXPLAIN (FORMAT JSON)"
        rows = (await session.execute(text(f"{explain} {counted}"))).all()
        plan = " ".join(str(value) for row in rows for value in row)
        assert await session.scalar(running_replies_of("heavy")) == 0
    assert "ix_conversations_user_id_running" in plan, plan


async def test_a_user_has_at_most_the_configured_conversations(start_service: Any) -> None:
    async with start_service(max_conversations=3) as service:
        created = await asyncio.gather(
            *(
                service.client.post("/v1/conversations", json={}, headers=service.auth())
                for _ in range(8)
            ),
            *(
                service.client.post(
                    "/v1/chat", json={"message": "hi", "background": True}, headers=service.auth()
                )
                for _ in range(4)
            ),
        )
        statuses = sorted(response.status_code for response in created)
        refused = [response for response in created if response.status_code == 409]
        listing = await service.client.get("/v1/conversations", headers=service.auth())
        others = await service.client.post(
            "/v1/conversations", json={}, headers=service.auth("bob")
        )
    assert len(listing.json()["data"]) == 3
    assert len([status for status in statuses if status in (201, 202)]) == 3
    assert len(refused) == 9
    assert {response.json()["code"] for response in refused} == {"too_many_conversations"}
    assert others.status_code == 201


async def test_the_running_reply_cap_is_exact_under_parallel_turns(
    start_service: Any, upstream: FakeUpstream
) -> None:
    held = asyncio.Event()
    upstream.default = Reply(gate=held)
    async with start_service(max_concurrent_replies=4) as service:
        conversations = [await service.create_conversation() for _ in range(20)]
        answers = await asyncio.gather(
            *(service.send(each["id"], "go", background=True) for each in conversations)
        )
        held.set()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [202] * 4 + [429] * 16
    assert len(upstream.requests) == 4


async def test_the_daily_quota_bounds_one_turn_and_concurrent_ones(
    start_service: Any, upstream: FakeUpstream
) -> None:
    quota = 1_000
    upstream.default = Reply(tokens=["word "] * 5_000)
    async with start_service(daily_token_quota=quota, max_concurrent_replies=8) as service:
        alone = await service.create_conversation()
        assert (await service.send(alone["id"], "talk")).status_code == 201
        spent_alone = await day_usage(service.state.sessionmaker, "alice")
        together = [await service.create_conversation("bob") for _ in range(4)]
        await asyncio.gather(*(service.send(each["id"], "talk", user="bob") for each in together))
        spent_together = await day_usage(service.state.sessionmaker, "bob")
    assert 0 < spent_alone <= quota
    assert 0 < spent_together <= quota
    assert all(request.body["max_tokens"] < quota for request in upstream.requests)


async def test_a_user_may_hold_only_so_many_streams_open(
    start_service: Any, upstream: FakeUpstream
) -> None:
    held = asyncio.Event()
    upstream.queue(Reply(gate=held))
    async with start_service(max_streams_per_user=3) as service:
        conversation = await service.create_conversation()
        started = await service.send(conversation["id"], "go", background=True)
        url = f"/v1/messages/{started.json()['assistant_message']['id']}/stream"
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(3):
                opened = await streams.enter_async_context(
                    service.client.stream("GET", url, headers=service.auth())
                )
                assert opened.status_code == 200
            refused = await service.client.get(url, headers=service.auth())
            assert refused.status_code == 429
            assert refused.json()["code"] == "too_many_streams"
            assert refused.headers["retry-after"] == "1"

        # Closed streams free their places, whichever way they ended.
        async def follows() -> bool:
            async with service.client.stream("GET", url, headers=service.auth()) as again:
                return bool(again.status_code == 200)

        assert await eventually(follows)
        held.set()
