"""A chat turn: store the user message, run the reply as a task, store the reply once it ends."""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from chatbot.chat.schemas import ChatRequest, SendMessage, TurnOptions
from chatbot.config import Settings
from chatbot.conversations.deps import conversation_not_found
from chatbot.conversations.models import Conversation
from chatbot.conversations.schemas import ConversationCreate
from chatbot.conversations.service import new_conversation
from chatbot.db import utcnow
from chatbot.errors import AppError, Conflict, UpstreamError
from chatbot.ids import parse_id
from chatbot.llm.client import ChatMessage, Completion, CompletionRequest, LLMClient
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.messages.schemas import MessageOut
from chatbot.streams.registry import Generation, GenerationRegistry, Outcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Turn:
    conversation_id: uuid.UUID
    user_message: MessageOut
    assistant_message: MessageOut
    generation: Generation


class ContentTooLong(AppError):
    status = 422
    code = "content_too_long"


class ChatService:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        llm: LLMClient,
        registry: GenerationRegistry,
    ) -> None:
        self._settings = settings
        self._sessionmaker = sessionmaker
        self._llm = llm
        self._registry = registry

    async def send(
        self, session: AsyncSession, user_id: str, conversation_id: str, body: SendMessage
    ) -> Turn:
        started = time.monotonic()
        self._check_limits(body.content, body, field="content")
        assistant_id = uuid.uuid4()
        conversation = await self._reserve(
            session, user_id, parse_id(conversation_id, conversation_not_found()), assistant_id
        )
        return await self._begin(session, conversation, body.content, body, assistant_id, started)

    async def chat(self, session: AsyncSession, user_id: str, body: ChatRequest) -> Turn:
        started = time.monotonic()
        self._check_limits(body.message, body, field="message")
        assistant_id = uuid.uuid4()
        if body.conversation_id is not None:
            conversation_id = parse_id(body.conversation_id, conversation_not_found())
            conversation = await self._reserve(session, user_id, conversation_id, assistant_id)
        else:
            conversation = new_conversation(
                user_id,
                ConversationCreate(
                    title=body.title,
                    model=body.model,
                    system_prompt=body.system_prompt,
                    metadata=body.metadata or {},
                ),
            )
            conversation.message_count = 2
            conversation.active_reply_id = assistant_id
            conversation.last_message_at = conversation.updated_at
            session.add(conversation)
            await session.flush()
        return await self._begin(session, conversation, body.message, body, assistant_id, started)

    def _check_limits(self, content: str, options: TurnOptions, *, field: str) -> None:
        if len(content) > self._settings.max_message_chars:
            raise ContentTooLong(
                f"The message is longer than {self._settings.max_message_chars} characters",
                errors=[{"loc": ["body", field], "msg": "too long"}],
            )
        limit = self._settings.max_output_tokens
        if options.max_output_tokens is not None and options.max_output_tokens > limit:
            raise AppError(
                f"max_output_tokens must be at most {limit}",
                code="validation_error",
                status=422,
                errors=[{"loc": ["body", "max_output_tokens"], "msg": f"at most {limit}"}],
            )

    async def _reserve(
        self,
        session: AsyncSession,
        user_id: str,
        conversation_id: uuid.UUID,
        assistant_id: uuid.UUID,
    ) -> Conversation:
        """Claim the conversation for one reply and two message positions, atomically.

        The conditional update is the whole lock: a concurrent turn finds `active_reply_id`
        set and gets 409, on SQLite and PostgreSQL alike, across any number of instances.
        """
        now = utcnow()
        claimed = await session.scalar(
            update(Conversation)
            .where(
                Conversation.id == conversation_id,
                Conversation.user_id == user_id,
                Conversation.active_reply_id.is_(None),
            )
            .values(
                active_reply_id=assistant_id,
                message_count=Conversation.message_count + 2,
                updated_at=now,
                last_message_at=now,
            )
            .returning(Conversation)
            .execution_options(populate_existing=True)
        )
        if claimed is not None:
            return claimed
        exists = await session.scalar(
            select(Conversation.id).where(
                Conversation.id == conversation_id, Conversation.user_id == user_id
            )
        )
        if exists is None:
            raise conversation_not_found()
        raise Conflict(
            "A reply is still being generated in this conversation", code="reply_in_progress"
        )

    async def _begin(
        self,
        session: AsyncSession,
        conversation: Conversation,
        content: str,
        options: TurnOptions,
        assistant_id: uuid.UUID,
        started: float,
    ) -> Turn:
        user_seq = conversation.message_count - 1
        history = await messages.recent(
            session,
            conversation.id,
            before_seq=user_seq,
            limit=self._settings.history_messages,
        )
        model = options.model or conversation.model or self._settings.model
        now = utcnow()
        user_message = Message(
            id=uuid.uuid4(),
            conversation_id=conversation.id,
            seq=user_seq,
            role=Role.USER,
            content=content,
            status=MessageStatus.COMPLETED,
            created_at=now,
            completed_at=now,
        )
        assistant_message = Message(
            id=assistant_id,
            conversation_id=conversation.id,
            seq=user_seq + 1,
            role=Role.ASSISTANT,
            content="",
            status=MessageStatus.IN_PROGRESS,
            model=self._llm.model_label(model),
            created_at=now,
        )
        messages.add(session, user_message, assistant_message)
        request = CompletionRequest(
            model=model,
            messages=[
                ChatMessage("system", conversation.system_prompt or self._settings.system_prompt),
                *(
                    ChatMessage(message.role.value, message.content)
                    for message in history
                    if message.content and message.role in (Role.USER, Role.ASSISTANT)
                ),
                ChatMessage("user", content),
            ],
            temperature=options.temperature,
            max_output_tokens=options.max_output_tokens,
        )
        # The user message is durable before the model is called.
        await session.commit()

        generation = Generation(assistant_id, conversation.id, conversation.user_id)
        self._registry.start(generation, self._generate(generation, request, started))
        return Turn(
            conversation_id=conversation.id,
            user_message=MessageOut.of(user_message),
            assistant_message=MessageOut.of(assistant_message),
            generation=generation,
        )

    async def _generate(
        self, generation: Generation, request: CompletionRequest, started: float
    ) -> None:
        """Runs as a task of its own: no request, and no database session, is held meanwhile."""
        ttft_ms: int | None = None
        completion: Completion | None = None
        error: AppError | None = None
        status = MessageStatus.COMPLETED
        try:
            async with asyncio.timeout(self._settings.request_timeout):
                async for event in self._llm.stream(request):
                    if isinstance(event, Completion):
                        completion = event
                    elif event.text:
                        if ttft_ms is None:
                            ttft_ms = _elapsed_ms(started)
                        generation.append(event.text)
            if not generation.length:
                status = MessageStatus.FAILED
                error = UpstreamError("The model returned an empty reply", code="empty_reply")
        except UpstreamError as exc:
            error = exc
        except TimeoutError:
            error = UpstreamError(
                f"The reply took longer than {self._settings.request_timeout:g} s",
                code="reply_timeout",
                status=504,
            )
        except asyncio.CancelledError:
            status = MessageStatus.INCOMPLETE
            error = AppError("The service stopped during the reply", code="shutdown", status=503)
            await self._store(generation, status, error, completion, ttft_ms, started)
            raise
        except Exception:
            logger.exception("reply %s failed", generation.message_id)
            error = AppError()
        if error is not None and status is MessageStatus.COMPLETED:
            status = MessageStatus.INCOMPLETE if generation.length else MessageStatus.FAILED
        await self._store(generation, status, error, completion, ttft_ms, started)

    async def _store(
        self,
        generation: Generation,
        status: MessageStatus,
        error: AppError | None,
        completion: Completion | None,
        ttft_ms: int | None,
        started: float,
    ) -> None:
        values: dict[str, Any] = {
            "content": generation.content,
            "status": status,
            "latency_ms": _elapsed_ms(started),
            "ttft_ms": ttft_ms,
            "completed_at": utcnow(),
            "error": {"code": error.code, "detail": error.detail} if error else None,
        }
        if completion is not None:
            values["finish_reason"] = completion.finish_reason
            if completion.model:
                values["model"] = completion.model
            if completion.usage is not None:
                values["prompt_tokens"] = completion.usage.prompt_tokens
                values["completion_tokens"] = completion.usage.completion_tokens
                values["total_tokens"] = completion.usage.total_tokens
        stored: dict[str, Any] | None = None
        try:
            async with self._sessionmaker() as session:
                await messages.finish(session, generation.message_id, values)
                await session.execute(
                    update(Conversation)
                    .where(
                        Conversation.id == generation.conversation_id,
                        Conversation.active_reply_id == generation.message_id,
                    )
                    .values(active_reply_id=None, updated_at=utcnow(), last_message_at=utcnow())
                )
                await session.commit()
                message = await messages.get(session, generation.message_id)
                if message is not None:
                    stored = MessageOut.of(message).model_dump(mode="json")
        except Exception:
            logger.exception("could not store reply %s", generation.message_id)
            error = AppError("The reply could not be stored", code="storage_failed", status=503)
        problem = None
        if error is not None:
            problem = error.to_problem() | {"assistant_message_id": str(generation.message_id)}
        generation.finish(
            Outcome(
                message=stored or {"id": str(generation.message_id)},
                problem=problem,
                headers=error.headers if error else None,
            )
        )


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
