import uuid

from chatbot.errors import NotFound


def parse_id(value: str, not_found: type[NotFound]) -> uuid.UUID:
    """Ids are opaque to clients: a malformed one is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise not_found() from None
