"""A chat turn: store the user message and start the reply, or find the turn a retry repeats."""

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.chat.generation import ReplyRunner
from chatbot.chat.models import IdempotencyKey
from chatbot.chat.schemas import ChatRequest, SendMessage, TurnOptions
from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TOKENS_PER_MESSAGE
from chatbot.conversations import repository as conversations
from chatbot.conversations.models import Conversation
from chatbot.conversations.schemas import ConversationCreate
from chatbot.conversations.service import new_conversation
from chatbot.db import utcnow
from chatbot.errors import AppError, BadRequest, Conflict, conversation_not_found
from chatbot.ids import parse_id
from chatbot.llm.client import CompletionRequest, LLMClient
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.messages.schemas import MessageOut
from chatbot.quotas import service as quotas
from chatbot.streams.keeper import IDEMPOTENCY_WINDOW
from chatbot.streams.registry import Generation, ReplyRegistry
from chatbot.tools.registry import ToolRegistry

IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
"""1 to 255 visible ASCII characters, inner spaces allowed (a structured-field string)."""
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


@dataclass(frozen=True, slots=True)
class Turn:
    conversation_id: uuid.UUID
    user_message: MessageOut
    assistant_message: MessageOut
    replayed: bool = False
    """True when an Idempotency-Key matched an earlier request: nothing new was sent."""


class ContentTooLong(AppError):
    status = 422
    code = "content_too_long"


def validated_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if _IDEMPOTENCY_KEY.fullmatch(key) is None:
        raise BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            code="invalid_idempotency_key",
        )
    return key


def _request_hash(target: str, body: TurnOptions) -> str:
    canonical = json.dumps(
        [target, body.model_dump(mode="json", exclude={"background"})], sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class ChatService:
    def __init__(
        self,
        settings: Settings,
        session: AsyncSession,
        runner: ReplyRunner,
        llm: LLMClient,
        registry: ReplyRegistry,
        context: ContextBuilder,
        tools: ToolRegistry,
    ) -> None:
        self._context = context
        self._tools = tools
        self._settings = settings
        self._session = session
        self._runner = runner
        self._llm = llm
        self._registry = registry

    async def send(
        self,
        user_id: str,
        conversation_id: str,
        body: SendMessage,
        idempotency_key: str | None = None,
    ) -> Turn:
        started = time.monotonic()
        self._check_limits(body.content, body, field="content")
        target_id = parse_id(conversation_id, conversation_not_found())
        key = validated_idempotency_key(idempotency_key)
        request_hash = _request_hash(str(target_id), body)
        if key and (turn := await self._replay(user_id, key, request_hash)):
            return turn
        try:
            assistant_id = uuid.uuid4()
            conversation = await self._reserve(user_id, target_id, assistant_id)
            return await self._begin(
                conversation, body.content, body, assistant_id, started, key, request_hash
            )
        except (Conflict, IntegrityError):
            if key and (turn := await self._replay_after_race(user_id, key, request_hash)):
                return turn
            raise

    async def chat(
        self, user_id: str, body: ChatRequest, idempotency_key: str | None = None
    ) -> Turn:
        if body.conversation_id is not None:
            return await self.send(
                user_id,
                body.conversation_id,
                SendMessage(
                    content=body.message,
                    model=body.model,
                    temperature=body.temperature,
                    max_output_tokens=body.max_output_tokens,
                    background=body.background,
                ),
                idempotency_key,
            )
        started = time.monotonic()
        self._check_limits(body.message, body, field="message")
        key = validated_idempotency_key(idempotency_key)
        request_hash = _request_hash("new", body)
        if key and (turn := await self._replay(user_id, key, request_hash)):
            return turn
        # The same cap the claim of an existing conversation applies.
        running = await conversations.running_replies(self._session, user_id)
        if running >= self._settings.max_concurrent_replies:
            raise quotas.too_many_replies(self._settings)
        assistant_id = uuid.uuid4()
        conversation = new_conversation(
            user_id,
            ConversationCreate(
                title=body.title,
                model=body.model,
                system_prompt=body.system_prompt,
                prompt_profile=body.prompt_profile,
                metadata=body.metadata or {},
                toolsets=body.toolsets,
            ),
            self._tools,
        )
        conversation.message_count = 2
        conversation.active_reply_id = assistant_id
        conversation.last_message_at = conversation.updated_at
        self._session.add(conversation)
        try:
            await self._session.flush()
            return await self._begin(
                conversation, body.message, body, assistant_id, started, key, request_hash
            )
        except IntegrityError:
            if key and (turn := await self._replay_after_race(user_id, key, request_hash)):
                return turn
            raise

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

    async def _replay(self, user_id: str, key: str, request_hash: str) -> Turn | None:
        """The turn an earlier request with this key started, if it is within the window."""
        record = await self._session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.created_at >= utcnow() - IDEMPOTENCY_WINDOW,
            )
        )
        if record is None:
            return None
        if record.request_hash != request_hash:
            raise AppError(
                "This Idempotency-Key was used for a different request",
                code="idempotency_key_reused",
                status=422,
            )
        user_message = await messages.get(self._session, record.user_message_id)
        assistant_message = await messages.get(self._session, record.assistant_message_id)
        if user_message is None or assistant_message is None:
            return None
        return Turn(
            conversation_id=record.conversation_id,
            user_message=MessageOut.of(user_message),
            assistant_message=MessageOut.of(assistant_message),
            replayed=True,
        )

    async def _replay_after_race(self, user_id: str, key: str, request_hash: str) -> Turn | None:
        # A concurrent request with the same key won; what it committed is our answer.
        await self._session.rollback()
        return await self._replay(user_id, key, request_hash)

    async def _reserve(
        self, user_id: str, conversation_id: uuid.UUID, assistant_id: uuid.UUID
    ) -> Conversation:
        """Claim the conversation for this turn; 409 while another reply is generated, 429
        when the user has as many replies under way as allowed."""
        claimed = await conversations.claim_reply(
            self._session,
            user_id,
            conversation_id,
            assistant_id,
            max_running=self._settings.max_concurrent_replies,
        )
        if claimed is not None:
            return claimed
        busy = await conversations.busy(self._session, user_id, conversation_id)
        if busy is None:
            raise conversation_not_found()
        if busy:
            raise Conflict(
                "A reply is still being generated in this conversation", code="reply_in_progress"
            )
        raise quotas.too_many_replies(self._settings)

    async def _begin(
        self,
        conversation: Conversation,
        content: str,
        options: TurnOptions,
        assistant_id: uuid.UUID,
        started: float,
        key: str | None,
        request_hash: str,
    ) -> Turn:
        user_seq = conversation.message_count - 1
        model = options.model or conversation.model or self._settings.model
        tools = self._tools.offered(conversation)
        tool_specs = [tool.to_openai() for tool in tools.values()]
        # Raises 413 before anything is stored or sent when the message cannot fit.
        context = await self._context.plan(
            self._session,
            conversation,
            before_seq=user_seq,
            new_content=content,
            model=model,
            max_output_tokens=options.max_output_tokens,
            tools=tool_specs,
        )
        await quotas.check_turn(
            self._session, self._settings, conversation.user_id, context.total_tokens
        )
        now = utcnow()
        user_message = Message(
            id=uuid.uuid4(),
            conversation_id=conversation.id,
            seq=user_seq,
            role=Role.USER,
            content=content,
            token_count=context.new_message_tokens - TOKENS_PER_MESSAGE,
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
            prompt_token_count=context.total_tokens,
            prompt_hash=context.prompt_hash,
            created_at=now,
            checkpoint_at=now,
        )
        messages.add(self._session, user_message, assistant_message)
        if key is not None:
            await self._record_key(conversation, key, request_hash, user_message, assistant_id)
        request = CompletionRequest(
            model=model,
            messages=context.messages,
            temperature=options.temperature,
            max_output_tokens=options.max_output_tokens,
            tools=tool_specs or None,
        )
        # The user message is durable before the model is called.
        await self._session.commit()

        generation = Generation(assistant_id, conversation.id, conversation.user_id)
        generation.reply_seq = assistant_message.seq
        follow_up = FollowUp(
            conversation_id=conversation.id,
            untitled=conversation.title is None,
            summary_due=(context.window_start_seq or user_seq) > conversation.summary_upto_seq + 1
            or len(context.history) + 2 > self._settings.history_messages,
            context_tokens=context.total_tokens,
            budget=context.budget,
        )
        self._registry.start(
            generation,
            self._runner.run(
                generation,
                request,
                started,
                follow_up,
                tools,
                prompt_tokens=context.total_tokens,
                budget=context.budget,
            ),
        )
        return Turn(
            conversation_id=conversation.id,
            user_message=MessageOut.of(user_message),
            assistant_message=MessageOut.of(assistant_message),
        )

    async def _record_key(
        self,
        conversation: Conversation,
        key: str,
        request_hash: str,
        user_message: Message,
        assistant_id: uuid.UUID,
    ) -> None:
        # An expired record of the same key would block the unique constraint.
        await self._session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.user_id == conversation.user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.created_at < utcnow() - IDEMPOTENCY_WINDOW,
            )
        )
        self._session.add(
            IdempotencyKey(
                user_id=conversation.user_id,
                key=key,
                request_hash=request_hash,
                conversation_id=conversation.id,
                user_message_id=user_message.id,
                assistant_message_id=assistant_id,
                created_at=utcnow(),
            )
        )
