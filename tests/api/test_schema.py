"""Schemathesis fuzzes every operation in the OpenAPI schema against the running service.

Schemathesis drives its requests synchronously, so the service and the fake model run in a
thread of their own, on a real loopback socket. Half the generated cases swap the random ids in
the path for ids of a real conversation and its messages, so the fuzzer gets past the 404s.
"""

import asyncio
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.config._checks import (
    NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES,
    NegativeDataRejectionConfig,
)
from schemathesis.specs.openapi.checks import positive_data_acceptance

from chatbot.app import create_app
from chatbot.auth.tokens import issue_token
from chatbot.chat.idempotency import KEY_PATTERN as IDEMPOTENCY_KEY_PATTERN
from chatbot.config import Settings
from chatbot.streams.sse import EVENT_ID_PATTERN
from tests.fake_upstream import FakeUpstream
from tests.support import LiveServer, settings_for

USER = "fuzz-user"
MAX_REQUEST_LINE = 65_000


class ThreadedService:
    """The service and its fake model on an event loop in a background thread."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.url = ""
        self.token = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fuzzed-service", daemon=True)

    def __enter__(self) -> "ThreadedService":
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError("the service did not start") from self._error
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        upstream = await FakeUpstream().start()
        try:
            # Whether a message fits the model's context depends on the model and on what the
            # conversation offers, which no schema can state: a budget nothing fuzzed outgrows.
            settings = settings_for(self.database_url, upstream.base_url, context_tokens=1_000_000)
            self.token = issue_token(settings, USER)
            async with LiveServer(create_app(settings)) as server:
                self.url = server.url
                self._ready.set()
                await self._stop.wait()
        finally:
            await upstream.stop()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def real_ids(self) -> dict[str, str]:
        """A fresh conversation with one finished turn: ids the fuzzer may then change or delete."""
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as client:
            conversation = client.post("/v1/conversations", json={}).json()
            turn = client.post(
                f"/v1/conversations/{conversation['id']}/messages", json={"content": "hi"}
            ).json()
        return {
            "conversation_id": conversation["id"],
            "message_id": turn["assistant_message"]["id"],
        }


@pytest.fixture
def fuzzed_service(database_url: str) -> Iterator[ThreadedService]:
    with ThreadedService(database_url) as running:
        yield running


# The schema the service serves at /openapi.json, read from the app itself at collection time.
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())
# NUL bytes and lone surrogates are rejected by rules JSON Schema cannot state for nested
# metadata; test_protection sends them on purpose.
schema.config.generation.update(allow_x00=False, codec="utf-8")
# A body over the configured size is refused before it is parsed, whatever else is wrong with it.
schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
    expected_statuses=[*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]
)


@schema.parametrize()
@schema.given(use_real_ids=st.booleans())
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors_and_responses_match_the_schema(
    case: Case[Any], use_real_ids: bool, fuzzed_service: ThreadedService
) -> None:
    # Containers are replaced, not edited in place, so that schemathesis sees what changed.
    headers = case.headers  # case-insensitive
    event_id = headers.get("Last-Event-ID") if headers is not None else None
    random_event_id = event_id is not None
    if use_real_ids and case.path_parameters:
        real = fuzzed_service.real_ids()
        case.path_parameters = {
            name: real.get(name, value) for name, value in case.path_parameters.items()
        }
        if headers is not None and _matches(EVENT_ID_PATTERN, event_id):
            headers["Last-Event-ID"] = f"{real['message_id']}:0"
            case.headers = headers
            random_event_id = False
    # Hypothesis repeats values across cases; a key reused for another body is a deliberate 422.
    # Only valid keys are made unique, so that invalid ones stay invalid.
    if headers is not None and _matches(IDEMPOTENCY_KEY_PATTERN, headers.get("Idempotency-Key")):
        headers["Idempotency-Key"] += f"-{uuid.uuid4()}"
        case.headers = headers
    if case.query and _matches(IDEMPOTENCY_KEY_PATTERN, case.query.get("idempotency_key")):
        case.query = {
            **case.query,
            "idempotency_key": f"{case.query['idempotency_key']}-{uuid.uuid4()}",
        }
    response = case.call(base_url=fuzzed_service.url, headers=fuzzed_service.headers, timeout=15)
    if len(response.request.path_url) >= MAX_REQUEST_LINE:
        # uvicorn refuses a request line it cannot parse before the app sees it.
        assert response.status_code == 400
        return
    # Random cursors and event ids are well-formed but name nothing: 400 is the right answer,
    # so such cases are held to every check but "schema-valid data is accepted".
    opaque = random_event_id or bool(case.query and case.query.get("cursor"))
    case.validate_response(
        response,
        headers=fuzzed_service.headers,
        excluded_checks=[positive_data_acceptance] if opaque else [],
    )


def _matches(pattern: str, value: object) -> bool:
    """A valid value, short enough to take a suffix and stay valid."""
    return isinstance(value, str) and len(value) <= 200 and re.search(pattern, value) is not None
