import uuid

from chatbot.errors import NotFound

MAX_USER_ID_LENGTH = 255


def is_user_id(value: object) -> bool:
    """The one rule for whom a request is for, whatever names it (a JWT `sub`, a stream token,
    `X-User-Id`, an MCP token, `chatbot token`, CHATBOT_MCP_USER): 1 to 255 printable
    characters (no control character, NUL, line break, lone surrogate or unusual space), none
    of them a space at either end, so that no two ids look alike and none can break a line
    of a log."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_USER_ID_LENGTH
        and value.isprintable()
        and value == value.strip()
    )


def parse_id(value: str, not_found: type[NotFound]) -> uuid.UUID:
    """Ids are opaque to clients: a malformed one is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise not_found() from None
