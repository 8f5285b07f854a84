from typing import Any

from fastapi import APIRouter

from chatbot.auth.deps import CurrentUser
from chatbot.context.tokens import REPLY_PRIMING_TOKENS
from chatbot.conversations.deps import OwnedConversation
from chatbot.deps import (
    ContextBuilderDep,
    LLMDep,
    ProfilesDep,
    SessionDep,
    SettingsDep,
    ToolsDep,
)

router = APIRouter(tags=["context"])


@router.get("/v1/conversations/{conversation_id}/context")
async def conversation_context(
    conversation: OwnedConversation,
    session: SessionDep,
    settings: SettingsDep,
    builder: ContextBuilderDep,
    registry: ToolsDep,
    llm: LLMDep,
) -> dict[str, Any]:
    """What the next turn would send the model, before its new message, and what it costs."""
    model = conversation.model or settings.model
    tools = registry.offered(
        conversation.toolsets, conversation.user_id, model_takes_tools=llm.takes_tools(model)
    )
    plan = await builder.plan(
        session,
        conversation,
        before_seq=conversation.message_count + 1,
        new_content=None,
        model=model,
        tools=[tool.to_openai() for tool in tools.values()],
    )
    return {
        # As the reply will record it (the offline demo answers as itself).
        "model": llm.model_label(plan.model),
        "encoding": plan.encoding,
        "context_window": plan.window.tokens,
        "context_window_source": plan.window.source,
        "budget": plan.budget,
        "total_tokens": plan.total_tokens,
        "available_for_new_message": max(0, plan.budget - plan.total_tokens),
        "reply_priming_tokens": REPLY_PRIMING_TOKENS,
        "system_prompt": {
            "source": plan.system_source,
            "content": plan.system_prompt,
            "tokens": plan.system_tokens,
        },
        "tools": {
            "toolsets": registry.toolsets_of(conversation.toolsets),
            "offered": list(tools),
            "tokens": plan.tool_tokens,
        },
        "summary": (
            {
                "content": plan.summary,
                "tokens": plan.summary_tokens,
                "covers": {"from_seq": 1, "to_seq": plan.summary_upto_seq},
                "updated_at": conversation.summary_updated_at,
            }
            if plan.summary
            else None
        ),
        "messages": [
            {
                "id": message.id,
                "seq": message.seq,
                "role": message.role,
                "status": message.status,
                "tokens": tokens,
            }
            for message, tokens in zip(plan.history, plan.history_tokens, strict=True)
        ],
        "omitted_messages": (plan.window_start_seq or conversation.message_count + 1)
        - plan.summary_upto_seq
        - 1,
    }


@router.get("/v1/prompts")
async def prompt_profiles(_: CurrentUser, profiles: ProfilesDep) -> dict[str, Any]:
    """The prompt profiles a conversation may name in `prompt_profile`."""
    return {
        "data": [{"name": name, "system_prompt": text} for name, text in profiles.items()],
        "default": profiles.default,
    }
