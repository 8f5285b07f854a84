from sqlalchemy.ext.asyncio import AsyncSession

from chatbot.conversations.models import Conversation
from chatbot.errors import InvalidCursor
from chatbot.messages import repository
from chatbot.messages.schemas import MessageOut
from chatbot.pagination import Page, decode_cursor, encode_cursor


async def list_page(
    session: AsyncSession, conversation: Conversation, *, limit: int, cursor: str | None
) -> Page[MessageOut]:
    after_seq = _message_position(cursor) if cursor else 0
    rows = await repository.list_after(
        session, conversation.id, after_seq=after_seq, limit=limit + 1
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor({"s": rows[-1].seq})
    return Page(data=[MessageOut.of(row) for row in rows], next_cursor=next_cursor)


def _message_position(cursor: str) -> int:
    position = decode_cursor(cursor).get("s")
    if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < 2**31:
        raise InvalidCursor()
    return position
