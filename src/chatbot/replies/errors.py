"""How a reply can end other than well, and why a turn could not start one."""

from chatbot.errors import AppError, Conflict, NotFound, ServiceUnavailable, UpstreamError


class ReplyInProgress(Conflict):
    code = "reply_in_progress"
    detail = "A reply is still being generated in this conversation"


class EmptyReply(UpstreamError):
    code = "empty_reply"
    detail = "The model returned an empty reply"


class ReplyTooLong(UpstreamError):
    code = "reply_too_long"


class ReplyTimeout(UpstreamError):
    status = 504
    code = "reply_timeout"


class UnexpectedToolCalls(UpstreamError):
    code = "unexpected_tool_calls"
    detail = "The model asked for tools it was not offered"


class TooManyToolRounds(UpstreamError):
    code = "too_many_tool_rounds"


class ServiceStopping(ServiceUnavailable):
    code = "shutdown"
    detail = "The service stopped during the reply"


class Interrupted(ServiceUnavailable):
    """Stored by the sweep on a reply whose producer is gone."""

    code = "interrupted"
    detail = "The service stopped while generating this reply"


class StorageFailed(ServiceUnavailable):
    code = "storage_failed"
    detail = "The reply could not be stored"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"
    detail = "The reply's stored state could not be read; follow it again shortly"


class ReplyGone(NotFound):
    code = "message_not_found"
    detail = "The reply no longer exists"


class ReplyFailed(AppError):
    """An unexpected failure inside the service while generating a reply."""
