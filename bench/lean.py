"""The lean reference server: the floor the benchmarks hold ours against.

The essential work of one of our turns and nothing more, in the shapes of our API (the part of
docs/api.md the harness uses), so that a figure can be given as ours / lean from one run: raw
Starlette under uvicorn (uvloop and httptools when installed, as ours), orjson, asyncpg or
aiosqlite (WAL), one worker. A turn: verify the HS256 JWT (`sub` is the user); claim the
conversation with one conditional UPDATE (404 missing, 409 busy); read its last 50 messages by
index; insert the user message and the in-progress reply, commit; stream the upstream's chat
completion, relaying each content delta; store the reply (content, usage, latency, time to first
token) and free the conversation in one statement (two in one transaction on SQLite).

Left out on purpose: following and resuming replies (a client that leaves ends its reply,
`cancelled`), checkpoints, idempotency keys, rate limits and quotas, token counting, context
budgets, titles, summaries, system prompts, tools, retries, validation beyond what a turn needs,
other routes, the connection guards of `chatbot serve`. Routes: POST /v1/conversations, POST
/v1/conversations/{id}/messages and POST /v1/chat (SSE with `Accept: text/event-stream`, else
JSON once the reply has ended), GET /readyz. `--client httpx` reads the upstream through httpx2
if installed (what ours' `openai` client is built on), else httpx; `--client aiohttp` through
aiohttp and its C parser.

`--decoupled` (configurations named `lean-*-decoupled-*`) produces each reply in a task of its
own, which the response follows through memory: what a reply that outlives its client (ours:
resume, background, cancel from elsewhere) needs at the least, a second task woken per token.
Nothing else changes; a client that leaves no longer ends its reply.

    python bench/lean.py --port 8100 --database-url sqlite+aiosqlite:///lean.db \\
        --upstream-url http://127.0.0.1:9100/v1 --jwt-secret S --client httpx
"""

import argparse
import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

SCHEMA = [  # type names both take: SQLite keeps the ids and times as text
    """CREATE TABLE IF NOT EXISTS conversations (id uuid PRIMARY KEY, user_id text NOT NULL,
        title text, model text, message_count integer NOT NULL, running_reply uuid,
        created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS messages (id uuid PRIMARY KEY,
        conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq integer NOT NULL, role text NOT NULL, content text NOT NULL, status text NOT NULL,
        model text, prompt_tokens integer, completion_tokens integer, total_tokens integer,
        latency_ms integer, ttft_ms integer, finish_reason text, created_at timestamptz NOT NULL,
        UNIQUE (conversation_id, seq))""",
]
CREATE = """INSERT INTO conversations (id, user_id, title, model, message_count, running_reply,
    created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)"""
CLAIM = """UPDATE conversations SET running_reply = $1, message_count = message_count + 2,
    updated_at = $2 WHERE id = $3 AND user_id = $4 AND running_reply IS NULL
    RETURNING message_count, model"""
EXISTS = "SELECT 1 FROM conversations WHERE id = $1 AND user_id = $2"
HISTORY = """SELECT role, content FROM messages WHERE conversation_id = $1
    ORDER BY seq DESC LIMIT 50"""
INSERT = """INSERT INTO messages (id, conversation_id, seq, role, content, status, model,
    created_at) VALUES ($1, $2, $3, 'user', $4, 'completed', NULL, $5),
    ($6, $2, $3 + 1, 'assistant', '', 'in_progress', $7, $5)"""
STORE = """UPDATE messages SET content = $2, status = $3, model = $4, prompt_tokens = $5,
    completion_tokens = $6, total_tokens = $7, latency_ms = $8, ttft_ms = $9,
    finish_reason = $10 WHERE id = $1"""
RELEASE = "UPDATE conversations SET running_reply = NULL, updated_at = $12 WHERE id = $11"


class Refused(Exception):
    """A request answered with a problem document: (status, code, detail)."""


def not_found() -> Refused:
    return Refused(404, "conversation_not_found", "Conversation not found")


class Turn:
    """One turn: who, where, what was sent, and the reply as it comes."""

    def __init__(self, user: str, conversation: str | None, content: str, model: Any) -> None:
        self.user, self.conversation, self.content, self.model = user, conversation, content, model
        self.started, self.created = time.perf_counter(), datetime.now(UTC)
        self.user_id, self.reply_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.parts: list[str] = []
        self.usage: dict[str, int] | None = None
        self.status, self.finish_reason = "in_progress", None
        self.ttft_ms: int | None = None
        self.latency_ms: int | None = None

    def messages(self) -> dict[str, Any]:
        """The turn's two messages as ours shows them (the reply as it stands)."""
        common = {"conversation_id": self.conversation, "created_at": self.created}
        user = {"id": self.user_id, "role": "user", "content": self.content}
        reply = {"id": self.reply_id, "role": "assistant", "content": "".join(self.parts)}
        reply |= {"status": self.status, "model": self.model, "usage": self.usage}
        reply |= {"latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms}
        reply["finish_reason"] = self.finish_reason
        return {
            "conversation_id": self.conversation,
            "user_message": common | user | {"status": "completed"},
            "assistant_message": common | reply,
        }

    def stored(self) -> tuple[Any, ...]:
        """The parameters of STORE and RELEASE."""
        usage = self.usage or {}
        counts = [usage.get(key) for key in ("prompt_tokens", "completion_tokens", "total_tokens")]
        return (
            self.reply_id, "".join(self.parts), self.status, self.model, *counts,
            self.latency_ms, self.ttft_ms, self.finish_reason, self.conversation, datetime.now(UTC),
        )  # fmt: skip


class Postgres:
    """A turn's statements, written against asyncpg's pool and connections."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+asyncpg://", "postgresql://", 1)

    async def open(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.url, min_size=4, max_size=30)
        for statement in SCHEMA:
            await self.pool.execute(statement)

    async def create(self, turn: Turn, title: Any) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            row = (turn.conversation, turn.user, title, turn.model, 0, None, turn.created)
            await connection.execute(CREATE, *row)

    async def begin(self, turn: Turn, title: Any) -> list[Any]:
        """Claim the conversation (create it, for /v1/chat without one), read its history and
        insert the turn's two messages, in one transaction; the history, newest first."""
        async with self.pool.acquire() as connection, connection.transaction():
            if turn.conversation is None:
                turn.conversation, count, history = str(uuid.uuid4()), 2, []
                row = (turn.conversation, turn.user, title, turn.model, 2, turn.reply_id)
                await connection.execute(CREATE, *row, turn.created)
            else:
                claim = (turn.reply_id, turn.created, turn.conversation, turn.user)
                if (claimed := await connection.fetchrow(CLAIM, *claim)) is None:
                    busy = await connection.fetchrow(EXISTS, turn.conversation, turn.user)
                    if not busy:
                        raise not_found()
                    raise Refused(409, "reply_in_progress", "A reply is running")
                count, turn.model = claimed[0], turn.model or claimed[1]
                history = await connection.fetch(HISTORY, turn.conversation)
            await connection.execute(
                INSERT, turn.user_id, turn.conversation, count - 1, turn.content, turn.created,
                turn.reply_id, turn.model,
            )  # fmt: skip
        return history

    async def finish(self, turn: Turn) -> None:
        await self.pool.execute(f"WITH reply AS ({STORE}) {RELEASE}", *turn.stored())

    async def close(self) -> None:
        await self.pool.close()


class Sqlite(Postgres):
    """The same statements on one aiosqlite connection, which stands in for asyncpg's pool and
    its connections; transactions one at a time (SQLite has one writer anyway)."""

    def __init__(self, url: str) -> None:
        self.path, self.lock = url.split(":///", 1)[1], asyncio.Lock()

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            await self.db.execute_fetchall(f"PRAGMA {pragma}")
        for statement in SCHEMA:
            await self.db.execute_fetchall(statement)
        self.pool = self

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator["Sqlite"]:
        yield self

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        async with self.lock:
            await self.db.execute_fetchall("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self.db.execute_fetchall("ROLLBACK")
                raise
            await self.db.execute_fetchall("COMMIT")

    async def fetch(self, sql: str, *params: Any) -> list[Any]:
        plain = [p.isoformat() if isinstance(p, datetime) else p for p in params]
        return list(await self.db.execute_fetchall(_numbered(sql), plain))

    async def fetchrow(self, sql: str, *params: Any) -> Any:
        return next(iter(await self.fetch(sql, *params)), None)

    execute = fetch

    async def finish(self, turn: Turn) -> None:
        stored = turn.stored()
        async with self.transaction():
            await self.fetch(STORE, *stored[:10])
            await self.fetch(RELEASE, *stored)  # ?11 and ?12, the first ten unused

    async def close(self) -> None:
        await self.db.close()


@functools.cache
def _numbered(sql: str) -> str:
    """`$1` as SQLite writes it, `?1`."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


class Upstream:
    """Streamed chat completions from the upstream, through httpx2 (else httpx) or aiohttp,
    each with a pool of kept-alive connections."""

    HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}

    def __init__(self, url: str, client: str) -> None:
        self.url = f"{url.rstrip('/')}/chat/completions"
        if client == "aiohttp":
            import aiohttp

            self.errors: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError)
            timeout = aiohttp.ClientTimeout(sock_connect=5, sock_read=60)
            connector = aiohttp.TCPConnector(limit=1000)
            self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)
            self.lines, self.close = self._aiohttp, self.session.close
            return
        try:
            import httpx2 as httpx  # what ours' openai client is built on
        except ImportError:
            import httpx
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5), limits=limits)
        self.errors, self.lines, self.close = (httpx.HTTPError,), self._httpx, self.client.aclose

    async def _httpx(self, body: bytes) -> AsyncIterator[str | bytes]:
        """The body's lines, read to its end so that the connection goes back to the pool."""
        async with self.client.stream("POST", self.url, content=body, headers=self.HEADERS) as r:
            if r.status_code != 200:
                raise Refused(502, "upstream_error", f"upstream status {r.status_code}")
            async for line in r.aiter_lines():
                yield line

    async def _aiohttp(self, body: bytes) -> AsyncIterator[str | bytes]:
        async with self.session.post(self.url, data=body, headers=self.HEADERS) as r:
            if r.status != 200:
                raise Refused(502, "upstream_error", f"upstream status {r.status}")
            async for line in r.content:  # line by line
                yield line


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)


def problem(status: int, code: str, detail: str) -> Response:
    body = dumps({"type": "about:blank", "status": status, "detail": detail, "code": code})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(body, status, headers, "application/problem+json")


class Lean:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        sqlite = args.database_url.startswith("sqlite")
        self.store = Sqlite(args.database_url) if sqlite else Postgres(args.database_url)
        self.producers: set[asyncio.Task[None]] = set()

    def user(self, request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused(401, "unauthorized", "A Bearer token is required")
        try:
            claims = jwt.decode(
                token, self.args.jwt_secret, algorithms=["HS256"], leeway=30,
                options={"require": ["exp", "sub"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:  # ours tells an expired one apart: token_expired
            raise Refused(401, "invalid_token", "The token is not valid") from exc
        return str(claims["sub"])

    async def create(self, request: Request) -> Response:
        user, body = self.user(request), orjson.loads(await request.body() or b"{}")
        turn = Turn(user, str(uuid.uuid4()), "", body.get("model"))
        await self.store.create(turn, body.get("title"))
        conversation = {"id": turn.conversation, "title": body.get("title"), "model": turn.model}
        conversation |= {"message_count": 0, "created_at": turn.created}
        return Response(dumps(conversation), 201, None, "application/json")

    async def send(self, request: Request) -> Response:
        user, body = self.user(request), orjson.loads(await request.body() or b"{}")
        if "conversation" in request.path_params:
            conversation, content = request.path_params["conversation"], body.get("content")
        else:  # POST /v1/chat
            conversation, content = body.get("conversation_id"), body.get("message")
        if not isinstance(content, str) or not content.strip():
            raise Refused(422, "validation_error", "The message's content is missing")
        if conversation is not None:
            try:
                conversation = str(uuid.UUID(conversation))
            except (ValueError, TypeError, AttributeError) as exc:
                raise not_found() from exc
        turn = Turn(user, conversation, content, body.get("model"))
        history = await self.store.begin(turn, body.get("title"))
        turn.model = turn.model or self.args.model
        messages = [{"role": role, "content": text} for role, text in reversed(history)]
        messages.append({"role": "user", "content": content})
        call = {"model": turn.model, "messages": messages, "stream": True}
        deltas = self.relay(turn, orjson.dumps(call | {"stream_options": {"include_usage": True}}))
        if self.args.decoupled:
            deltas = self.followed(deltas)
        if "text/event-stream" in request.headers.get("accept", ""):
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self.sse(turn, deltas), 200, headers, "text/event-stream")
        async for _ in deltas:
            pass
        if turn.status != "completed":
            return problem(502, "upstream_error", "The model provider failed")
        return Response(dumps(turn.messages() | {"tool_calls": []}), 201, None, "application/json")

    async def relay(self, turn: Turn, call: bytes) -> AsyncIterator[str]:
        """The reply's text as it comes, each `data:` line parsed with orjson; the reply stored
        and its conversation freed however it ends (`cancelled` when the client left)."""
        try:
            async for line in self.upstream.lines(call):
                if line[:7] not in ("data: {", b"data: {"):
                    continue  # blank lines, [DONE]
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    turn.usage = chunk["usage"]
                if choices := chunk.get("choices"):
                    if text := choices[0].get("delta", {}).get("content"):
                        if turn.ttft_ms is None:
                            turn.ttft_ms = round((time.perf_counter() - turn.started) * 1000)
                        turn.parts.append(text)
                        yield text
                    turn.finish_reason = choices[0].get("finish_reason") or turn.finish_reason
                turn.model = chunk.get("model") or turn.model
            turn.status = "completed"
        except (Refused, ValueError, *self.upstream.errors):
            turn.status = "incomplete" if turn.parts else "failed"
        finally:
            if turn.status == "in_progress":
                turn.status = "cancelled"
            turn.latency_ms = round((time.perf_counter() - turn.started) * 1000)
            await asyncio.shield(self.store.finish(turn))

    async def followed(self, deltas: AsyncIterator[str]) -> AsyncIterator[str]:
        """`deltas` produced by a task of its own, followed here: the producer appends to a
        list and wakes the follower, which takes whatever came since it last woke."""
        parts: list[str] = []
        waiting: list[asyncio.Future[None]] = []
        ended = False

        def wake() -> None:
            while waiting:
                if not (waiter := waiting.pop()).done():
                    waiter.set_result(None)

        async def produce() -> None:
            nonlocal ended
            try:
                async for text in deltas:
                    parts.append(text)
                    wake()
            finally:
                ended = True
                wake()

        producer = asyncio.create_task(produce())
        self.producers.add(producer)
        producer.add_done_callback(self.producers.discard)
        sent = 0
        while True:
            if sent < len(parts):
                batch, sent = parts[sent:], len(parts)
                for text in batch:
                    yield text
            elif ended:
                return
            else:
                waiting.append(asyncio.get_running_loop().create_future())
                await waiting[-1]

    async def sse(self, turn: Turn, deltas: AsyncIterator[str]) -> AsyncIterator[bytes]:
        reply = turn.reply_id.encode()
        yield b"id: %s:0\r\nevent: start\r\ndata: %s\r\n\r\n" % (reply, dumps(turn.messages()))
        position = 0
        async for text in deltas:
            position += len(text)
            data = orjson.dumps({"content": text})
            yield b"id: %s:%d\r\nevent: delta\r\ndata: %s\r\n\r\n" % (reply, position, data)
        if turn.status == "completed":
            done = {"assistant_message": turn.messages()["assistant_message"], "tool_calls": []}
            yield b"event: done\r\ndata: %s\r\n\r\n" % dumps(done)
        else:
            error = {"status": 502, "code": "upstream_error", "assistant_message_id": turn.reply_id}
            yield b"event: error\r\ndata: %s\r\n\r\n" % dumps(error)

    async def readyz(self, request: Request) -> Response:
        await self.store.pool.fetchrow("SELECT 1")
        return Response(b'{"status":"ready"}', 200, None, "application/json")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.upstream = Upstream(self.args.upstream_url, self.args.client)  # in the loop
        await self.store.open()
        yield
        await self.upstream.close()
        await self.store.close()

    def app(self) -> Starlette:
        async def refused(request: Request, exc: Exception) -> Response:
            return problem(*exc.args)

        async def invalid_json(request: Request, exc: Exception) -> Response:
            return problem(400, "invalid_json", "The body is not valid JSON")

        routes = [
            Route("/v1/conversations", self.create, methods=["POST"]),
            Route("/v1/conversations/{conversation}/messages", self.send, methods=["POST"]),
            Route("/v1/chat", self.send, methods=["POST"]),
            Route("/readyz", self.readyz),
        ]
        handlers = {Refused: refused, orjson.JSONDecodeError: invalid_json}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self.lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--database-url", required=True, help="sqlite+aiosqlite:///, postgresql://")
    parser.add_argument("--upstream-url", required=True, help="http://HOST:PORT/v1")
    parser.add_argument("--jwt-secret", required=True)
    parser.add_argument("--client", choices=["httpx", "aiohttp"], default="httpx")
    parser.add_argument("--model", default="gpt-4o-mini", help="when a conversation names none")
    parser.add_argument(
        "--decoupled", action="store_true", help="each reply produced by a task of its own"
    )
    args = parser.parse_args()
    # uvicorn's defaults pick uvloop and httptools when they are installed, as for ours.
    uvicorn.run(
        Lean(args).app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
