"""Who is calling: JWTs, strict per-user isolation, and the local no-auth mode."""

import asyncio
import time
from typing import Any

import jwt
import pytest

from chatbot.auth import tokens
from chatbot.auth.tokens import verify_token
from chatbot.config import ConfigError, Settings
from chatbot.errors import Unauthorized
from tests.support import JWT_SECRET, Service


def _token(claims: dict[str, Any], secret: str = JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def _alg_none_token(claims: dict[str, Any]) -> str:
    import base64
    import json

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


NOW = int(time.time())
BAD_CREDENTIALS = {
    "missing": None,
    "not bearer": "Basic YWxpY2U6c2VjcmV0",
    "garbage": "Bearer not-a-jwt",
    "expired": f"Bearer {_token({'sub': 'alice', 'exp': NOW - 3600})}",
    "forged": f"Bearer {_token({'sub': 'alice', 'exp': NOW + 3600}, secret='x' * 40)}",
    "alg none": f"Bearer {_alg_none_token({'sub': 'alice', 'exp': NOW + 3600})}",
    "no sub": f"Bearer {_token({'exp': NOW + 3600})}",
    "empty sub": f"Bearer {_token({'sub': '', 'exp': NOW + 3600})}",
    "no exp": f"Bearer {_token({'sub': 'alice'})}",
}

# Signed, but naming nobody a log line or a lookup can hold.
ODD_SUBJECTS: dict[str, object] = {
    "NUL in sub": "ali\x00ce",
    "lone surrogate sub": "ali\ud800ce",
    "sub ending in a newline": "alice\n",
    "sub with a space at its start": " alice",
    "sub of 256 characters": "a" * 256,
    "sub not a string": 7,
}
BAD_CREDENTIALS |= {
    name: "Bearer " + _token({"sub": subject, "exp": NOW + 3600})
    for name, subject in ODD_SUBJECTS.items()
}

ROUTES = [
    ("GET", "/v1/conversations"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/{id}"),
    ("PATCH", "/v1/conversations/{id}"),
    ("DELETE", "/v1/conversations/{id}"),
    ("GET", "/v1/conversations/{id}/messages"),
    ("POST", "/v1/conversations/{id}/messages"),
    ("POST", "/v1/chat"),
]


@pytest.mark.parametrize("credential", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
async def test_every_route_answers_401_to_bad_credentials(
    service: Service, credential: str | None
) -> None:
    conversation = await service.create_conversation()
    headers = {"Authorization": credential} if credential else {}
    for method, path in ROUTES:
        response = await service.client.request(
            method,
            path.format(id=conversation["id"]),
            json={"content": "hi", "message": "hi"} if method == "POST" else {},
            headers=headers,
        )
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"
    assert len(service.upstream.requests) == 0


async def test_health_checks_need_no_token(service: Service) -> None:
    assert (await service.client.get("/healthz")).status_code == 200
    ready = await service.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_another_users_conversation_is_404_everywhere(service: Service) -> None:
    conversation = await service.create_conversation("alice", title="private")
    await service.send(conversation["id"], "my secret", user="alice")
    requests_before = len(service.upstream.requests)
    for method, path in ROUTES:
        if "{id}" not in path:
            continue
        for conversation_id in (conversation["id"], "00000000-0000-0000-0000-000000000000"):
            response = await service.client.request(
                method,
                path.format(id=conversation_id),
                json={"title": "mine now"} if method == "PATCH" else {"content": "hi"},
                headers=service.auth("mallory"),
            )
            assert response.status_code == 404, (method, path)
            assert response.json()["code"] == "conversation_not_found"
    hijack = await service.client.post(
        "/v1/chat",
        json={"message": "hi", "conversation_id": conversation["id"]},
        headers=service.auth("mallory"),
    )
    assert hijack.status_code == 404
    assert len(service.upstream.requests) == requests_before

    listing = await service.client.get("/v1/conversations", headers=service.auth("mallory"))
    assert listing.json() == {"data": [], "next_cursor": None}
    # Alice still has everything, untouched.
    mine = await service.client.get(
        f"/v1/conversations/{conversation['id']}", headers=service.auth("alice")
    )
    assert mine.json()["title"] == "private"
    assert len(await service.messages(conversation["id"], "alice")) == 2


async def test_without_auth_the_user_is_local_or_x_user_id(start_service: Any) -> None:
    async with start_service(auth="none") as service:
        created = await service.client.post("/v1/conversations", json={"title": "a"})
        assert created.status_code == 201
        bob = await service.client.post(
            "/v1/conversations", json={"title": "b"}, headers={"X-User-Id": "bob"}
        )
        assert bob.status_code == 201
        local = (await service.client.get("/v1/conversations")).json()["data"]
        assert [conversation["title"] for conversation in local] == ["a"]
        other = await service.client.get(
            f"/v1/conversations/{created.json()['id']}", headers={"X-User-Id": "bob"}
        )
        assert other.status_code == 404


@pytest.mark.parametrize(
    "user_id",
    ["a\u200bb", "a\tb", "x" * 256, "caf\u00e9\u00a0"],
    ids=["zero-width", "tab", "long", "nbsp"],
)
async def test_an_x_user_id_breaking_the_rule_is_401(start_service: Any, user_id: str) -> None:
    async with start_service(auth="none") as service:
        response = await service.client.get(
            "/v1/conversations", headers={"X-User-Id": user_id.encode("utf-8")}
        )
        assert response.status_code == 401
        assert response.json()["code"] == "invalid_user_id"


def test_refuses_to_start_without_auth_on_a_public_address() -> None:
    settings = Settings(_env_file=None, auth="none", host="0.0.0.0")
    with pytest.raises(ConfigError, match="loopback"):
        settings.check_startup()


def test_a_jwt_secret_turns_authentication_on() -> None:
    assert Settings(_env_file=None).auth_mode == "none"
    assert Settings(_env_file=None, jwt_secret=JWT_SECRET).auth_mode == "jwt"
    Settings(_env_file=None, jwt_secret=JWT_SECRET, host="0.0.0.0").check_startup()
    with pytest.raises(ConfigError, match="32"):
        Settings(_env_file=None, jwt_secret="short").check_startup()
    with pytest.raises(ConfigError):
        Settings(_env_file=None, auth="jwt").check_startup()


async def test_a_token_accepted_before_is_refused_once_it_expires(start_service: Any) -> None:
    """Verified tokens are remembered, but never past their `exp` (plus the leeway)."""
    async with start_service(jwt_leeway_seconds=0) as service:
        expires = int(time.time()) + 2
        headers = {"Authorization": f"Bearer {_token({'sub': 'alice', 'exp': expires})}"}
        assert (await service.client.get("/v1/conversations", headers=headers)).status_code == 200
        assert (await service.client.get("/v1/conversations", headers=headers)).status_code == 200
        await asyncio.sleep(expires - time.time() + 0.05)  # past `exp`, leeway 0
        for _ in range(2):
            refused = await service.client.get("/v1/conversations", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["code"] == "token_expired"


def test_a_remembered_token_holds_only_for_the_settings_that_verified_it() -> None:
    token = _token({"sub": "alice", "exp": int(time.time()) + 600})
    ours = Settings(_env_file=None, jwt_secret=JWT_SECRET)
    assert verify_token(ours, token) == "alice"
    for other in (
        Settings(_env_file=None, jwt_secret="y" * 40),
        Settings(_env_file=None, jwt_secret=JWT_SECRET, jwt_audience="someone-else"),
        Settings(_env_file=None, jwt_secret=JWT_SECRET, jwt_issuer="https://elsewhere"),
    ):
        with pytest.raises(Unauthorized):
            verify_token(other, token)
    assert verify_token(ours, token) == "alice"


def test_only_verified_tokens_are_remembered_and_never_too_many() -> None:
    settings = Settings(_env_file=None, jwt_secret=JWT_SECRET)
    tokens._verified.clear()
    exp = int(time.time()) + 600
    for n in range(200):
        with pytest.raises(Unauthorized):
            verify_token(settings, _token({"sub": "alice", "exp": exp, "n": n}, secret="z" * 40))
    assert len(tokens._verified) == 0
    for n in range(tokens.VERIFIED_CACHE_SIZE + 50):
        verify_token(settings, _token({"sub": f"user-{n}", "exp": exp}))
    assert len(tokens._verified) == tokens.VERIFIED_CACHE_SIZE
    newest = _token({"sub": f"user-{tokens.VERIFIED_CACHE_SIZE + 49}", "exp": exp})
    assert verify_token(settings, newest) == f"user-{tokens.VERIFIED_CACHE_SIZE + 49}"
