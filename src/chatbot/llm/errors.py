"""How a model provider failed, mapped once (see `openai_client.upstream_error`)."""

from chatbot.errors import UpstreamError


class UpstreamRateLimited(UpstreamError):
    status = 429
    code = "upstream_rate_limited"
    detail = "The model provider is rate limiting requests; try again later"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    detail = "The model provider did not answer in time"


class UpstreamDisconnected(UpstreamError):
    code = "upstream_disconnected"
    detail = "The connection to the model provider broke during the reply"


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    detail = "The model provider could not be reached"


class UpstreamAuthFailed(UpstreamError):
    code = "upstream_auth_failed"
    detail = "The model provider refused our credentials"


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"
    detail = "The model provider rejected the request"


class UpstreamReportedError(UpstreamError):
    detail = "The model provider reported an error during the reply"


class UpstreamInvalidResponse(UpstreamError):
    detail = "The model provider sent an invalid response"


class UpstreamContextExceeded(UpstreamRejected):
    """The provider refused the prompt as longer than its model's context window; `window` is
    the size it named, if it named one (already learned for the model by the client)."""

    detail = "The model provider rejected the prompt as longer than its context window"

    def __init__(self, detail: str | None = None, *, window: int | None = None) -> None:
        super().__init__(detail)
        self.window = window
