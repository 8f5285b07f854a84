"""Starting a turn: claim the conversation, store the user message with the reply's row, and
start the reply; or find the turn a retry with the same Idempotency-Key repeats."""

import time
import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.chat import idempotency
from chatbot.chat.errors import ContentTooLong
from chatbot.chat.schemas import ChatRequest, SendMessage, TurnOptions
from chatbot.config import Settings
from chatbot.context.builder import ContextBuilder
from chatbot.context.chores import FollowUp
from chatbot.context.tokens import TOKENS_PER_MESSAGE
from chatbot.conversations import repository as conversations
from chatbot.conversations.models import Conversation
from chatbot.conversations.schemas import ConversationCreate
from chatbot.conversations.service import new_conversation
from chatbot.db import detached, utcnow
from chatbot.errors import ConversationNotFound, Unprocessable
from chatbot.ids import parse_id
from chatbot.llm.client import CompletionRequest, LLMClient
from chatbot.messages import repository as messages
from chatbot.messages.models import Message, MessageStatus, Role
from chatbot.messages.schemas import MessageOut
from chatbot.quotas import service as quotas
from chatbot.replies import repository as replies
from chatbot.replies.errors import ReplyInProgress
from chatbot.replies.live import ReplyRef
from chatbot.replies.runner import ReplyJob
from chatbot.replies.service import Replies
from chatbot.tools.registry import ToolRegistry


@dataclass(frozen=True, slots=True)
class Turn:
    conversation_id: uuid.UUID
    user_message: MessageOut
    assistant_message: MessageOut
    replayed: bool = False
    """True when an Idempotency-Key matched an earlier request: nothing new was sent."""


class ChatService:
    def __init__(
        self,
        settings: Settings,
        session: AsyncSession,
        replies: Replies,
        llm: LLMClient,
        context: ContextBuilder,
        tools: ToolRegistry,
    ) -> None:
        self._settings = settings
        self._session = session
        self._replies = replies
        self._llm = llm
        self._context = context
        self._tools = tools

    async def send(
        self,
        user_id: str,
        conversation_id: str,
        body: SendMessage,
        idempotency_key: str | None = None,
    ) -> Turn:
        started = time.monotonic()
        self._check_limits(body.content, body, field="content")
        target_id = parse_id(conversation_id, ConversationNotFound)
        key = idempotency.validated_key(idempotency_key)
        hashed = idempotency.request_hash(str(target_id), body) if key else ""
        if key and (turn := await self._replay(user_id, key, hashed)):
            return turn
        await self._learn_window(body.model)
        try:
            assistant_id = uuid.uuid4()
            conversation = await self._reserve(user_id, target_id, assistant_id)
            return await self._begin(
                conversation, body.content, body, assistant_id, started, key, hashed
            )
        except (ReplyInProgress, IntegrityError):
            if key and (turn := await self._replay_after_race(user_id, key, hashed)):
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
        key = idempotency.validated_key(idempotency_key)
        hashed = idempotency.request_hash("new", body) if key else ""
        if key and (turn := await self._replay(user_id, key, hashed)):
            return turn
        await self._learn_window(body.model)
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
        try:
            # Added idle, then claimed as any conversation is: one rule caps running replies
            # (and the turn rolls back whole when a cap refuses it).
            await conversations.add_within(
                self._session, conversation, limit=self._settings.max_conversations
            )
            claimed = await self._reserve(user_id, conversation.id, assistant_id)
            # The session's copy predates the claim: the claimed row is the one to read.
            self._session.expunge(conversation)
            conversation = claimed
            return await self._begin(
                conversation, body.message, body, assistant_id, started, key, hashed
            )
        except IntegrityError:
            if key and (turn := await self._replay_after_race(user_id, key, hashed)):
                return turn
            raise

    async def _learn_window(self, model: str | None) -> None:
        """Ask the model's server for its window, if it was never asked, before the turn takes
        its locks: the turn then plans from what is known (a conversation's own model, rarer,
        is asked on its first turn, once)."""
        await self._context.window(model or self._settings.model)

    def _check_limits(self, content: str, options: TurnOptions, *, field: str) -> None:
        if len(content) > self._settings.max_message_chars:
            raise ContentTooLong(
                f"The message is longer than {self._settings.max_message_chars} characters",
                errors=[{"loc": ["body", field], "msg": "too long"}],
            )
        limit = self._settings.max_output_tokens
        if options.max_output_tokens is not None and options.max_output_tokens > limit:
            raise Unprocessable(
                f"max_output_tokens must be at most {limit}",
                errors=[{"loc": ["body", "max_output_tokens"], "msg": f"at most {limit}"}],
            )

    async def _replay(self, user_id: str, key: str, hashed: str) -> Turn | None:
        """The turn an earlier request with this key started, if it is within the window."""
        record = await idempotency.find(self._session, user_id, key, hashed)
        if record is None:
            return None
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

    async def _replay_after_race(self, user_id: str, key: str, hashed: str) -> Turn | None:
        # A concurrent request with the same key won; what it committed is our answer.
        await self._session.rollback()
        return await self._replay(user_id, key, hashed)

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
            raise ConversationNotFound()
        if busy:
            raise ReplyInProgress()
        raise quotas.too_many_replies(self._settings)

    async def _begin(
        self,
        conversation: Conversation,
        content: str,
        options: TurnOptions,
        assistant_id: uuid.UUID,
        started: float,
        key: str | None,
        hashed: str,
    ) -> Turn:
        user_seq = conversation.message_count - 1
        model = options.model or conversation.model or self._settings.model
        tools = self._tools.offered(
            conversation.toolsets,
            conversation.user_id,
            model_takes_tools=self._llm.takes_tools(model),
        )
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
        max_tokens = await quotas.admit_call(
            self._session,
            self._settings,
            user_id=conversation.user_id,
            conversation_id=conversation.id,
            prompt_tokens=context.total_tokens,
            max_output_tokens=options.max_output_tokens,
        )
        now = utcnow()
        user_message = detached(  # its row goes in with the reply's (`add_turn`)
            Message,
            {
                "id": uuid.uuid4(),
                "conversation_id": conversation.id,
                "seq": user_seq,
                "role": Role.USER,
                "content": content,
                "token_count": context.new_message_tokens - TOKENS_PER_MESSAGE,
                "status": MessageStatus.COMPLETED,
                "created_at": now,
                "completed_at": now,
            },
        )
        ref = ReplyRef(assistant_id, conversation.id, conversation.user_id)
        assistant_message = await replies.add_turn(
            self._session,
            user_message,
            ref,
            model=self._llm.model_label(model),
            prompt_token_count=context.total_tokens,
            prompt_hash=context.prompt_hash,
        )
        if key is not None:
            await idempotency.record(
                self._session,
                user_id=conversation.user_id,
                key=key,
                hashed=hashed,
                conversation_id=conversation.id,
                user_message_id=user_message.id,
                assistant_message_id=assistant_id,
            )
        # The user message is durable before the model is called.
        await self._session.commit()

        follow_up = FollowUp(
            conversation_id=conversation.id,
            untitled=conversation.title is None,
            summary_due=(context.window_start_seq or user_seq) > conversation.summary_upto_seq + 1
            or len(context.history) + 2 > self._settings.history_messages,
            context_tokens=context.total_tokens,
            budget=context.budget,
        )
        request = CompletionRequest(
            model=model,
            messages=context.messages,
            temperature=options.temperature,
            max_output_tokens=max_tokens,
            tools=tool_specs or None,
        )
        self._replies.start(
            ref,
            assistant_message.seq,
            ReplyJob(
                request=request,
                started=started,
                prompt_tokens=context.total_tokens,
                budget=context.budget,
                max_output_tokens=options.max_output_tokens,
                tools=tools,
                follow_up=follow_up,
            ),
        )
        return Turn(
            conversation_id=conversation.id,
            user_message=MessageOut.of(user_message),
            assistant_message=MessageOut.of(assistant_message),
        )
