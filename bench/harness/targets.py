"""What a streaming scenario talks to, and as whom: each started server as a target (ours and
the lean one as a user of its own per client, LiteLLM with its master key, the upstream as it
is), and each client as a slot with its token, its conversations and its connections.

The same question goes to every target, so that they do the same work: on those that speak
our API into one of the client's conversations (POST .../messages, SSE), on the others as an
OpenAI chat completion with the usage chunk asked for, as the service asks its upstream.
"""

import asyncio
import json
from dataclasses import dataclass, field

import httpx

from .clients import RawStream, user_token
from .servers import LITELLM, Server, is_ours, speaks_ours


@dataclass
class Slot:
    """One client: its user, its conversations on each of ours, its connections."""

    index: int
    token: str
    conversations: dict[str, list[str]] = field(default_factory=dict)
    connections: dict[str, RawStream] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    """Requests sent so far, by configuration."""

    def connection(self, name: str, port: int) -> RawStream:
        """The client's connection to the configuration `name`, made on first use."""
        if name not in self.connections:
            self.connections[name] = RawStream("127.0.0.1", port)
        return self.connections[name]

    def drop_connection(self, name: str) -> None:
        if connection := self.connections.pop(name, None):
            connection.close()

    def close(self) -> None:
        for connection in self.connections.values():
            connection.close()


def make_slots(count: int, secret: str, prefix: str) -> list[Slot]:
    """`count` clients, each a user of its own (`bench-<prefix>-<index>`)."""
    return [Slot(index, user_token(secret, f"bench-{prefix}-{index}")) for index in range(count)]


@dataclass
class Target:
    """How to reach a started server: ours as a user, LiteLLM with its master key."""

    server: Server
    master_key: str | None = None

    @classmethod
    def of(cls, server: Server, master_key: str) -> "Target":
        return cls(server, master_key if server.name == LITELLM else None)

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        """The process that serves it (the upstream itself for `direct`)."""
        return self.server.pid

    def pids(self) -> list[int]:
        """Its processes: the main one and its children (a service's workers)."""
        return self.server.pids()

    @property
    def ours(self) -> bool:
        """Our service itself."""
        return is_ours(self.name)

    @property
    def speaks_ours(self) -> bool:
        """Ours or the lean server: our API, conversations and SSE events."""
        return speaks_ours(self.name)

    def request(
        self, slot: Slot, model: str, *, background: bool = False
    ) -> tuple[str, bytes, dict[str, str]]:
        """The next streamed request of `slot`: path, body and headers. On ours, `background`
        asks for the turn to be started only (202), its reply followed elsewhere."""
        turn = slot.turns[self.name] = slot.turns.get(self.name, 0) + 1
        content = f"client {slot.index} turn {turn}: how far is the moon?"
        if self.speaks_ours:
            # In turn through the client's conversations, so that each stays short.
            conversations = slot.conversations[self.name]
            conversation_id = conversations[turn % len(conversations)]
            message: dict[str, object] = {"content": content}
            if background:
                message["background"] = True
            return (
                f"/v1/conversations/{conversation_id}/messages",
                json.dumps(message).encode(),
                {"Authorization": f"Bearer {slot.token}", "Accept": "text/event-stream"},
            )
        headers = {"Accept": "text/event-stream"}
        if self.master_key:
            headers["Authorization"] = f"Bearer {self.master_key}"
        body = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}],
        }
        return "/v1/chat/completions", json.dumps(body).encode(), headers

    def first_token(self, name: str, data: str) -> bool:
        """Whether the SSE event (name, data) carries content: the first token."""
        if self.speaks_ours:
            return name == "delta"
        if data == "[DONE]":
            return False
        choices = json.loads(data).get("choices") or [{}]
        return bool(choices[0].get("delta", {}).get("content"))

    @property
    def end_marker(self) -> bytes:
        """What the stream's last event starts with."""
        return b"event: done" if self.speaks_ours else b"data: [DONE]"

    @property
    def error_marker(self) -> bytes:
        """What an event reporting a failure in mid-stream starts with."""
        return b"event: error" if self.speaks_ours else b'data: {"error"'


async def prepare_conversations(
    targets: list[Target], slots: list[Slot], model: str, per_slot: int, first_turn_model: str
) -> None:
    """`per_slot` conversations with `model` for every client on each server of our API, each
    already past one turn with `first_turn_model` (on ours it titles the conversation, a chore
    of the first exchange only), so that measured turns are typical."""
    for target in targets:
        if target.speaks_ours:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{target.port}",
                timeout=60,
                limits=httpx.Limits(max_connections=25),
            ) as client:
                await asyncio.gather(
                    *(
                        _conversations(client, target, slot, model, per_slot, first_turn_model)
                        for slot in slots
                    )
                )


async def _conversations(
    client: httpx.AsyncClient,
    target: Target,
    slot: Slot,
    model: str,
    count: int,
    first_turn_model: str,
) -> None:
    headers = {"Authorization": f"Bearer {slot.token}"}
    ids = slot.conversations.setdefault(target.name, [])
    for _ in range(count):
        response = await client.post("/v1/conversations", json={"model": model}, headers=headers)
        response.raise_for_status()
        ids.append(response.json()["id"])
        response = await client.post(
            f"/v1/conversations/{ids[-1]}/messages",
            json={"content": "hello", "model": first_turn_model},
            headers=headers,
        )
        response.raise_for_status()
