from chatbot.errors import BadRequest


class InvalidEventId(BadRequest):
    code = "invalid_event_id"
    detail = "Last-Event-ID is not an id this service sent"


class NotAReply(BadRequest):
    code = "not_a_reply"
    detail = "Only assistant messages can be followed"
