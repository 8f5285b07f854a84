from chatbot.errors import BadRequest, Unprocessable


class ContentTooLong(Unprocessable):
    code = "content_too_long"


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"
    detail = "Idempotency-Key must be 1 to 255 visible ASCII characters"


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"
    detail = "This Idempotency-Key was used for a different request"


class EventIdOfAnotherConversation(BadRequest):
    code = "invalid_event_id"
    detail = "Last-Event-ID belongs to another conversation"
