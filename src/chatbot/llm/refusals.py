"""What a provider's refusal is about, when a changed request could avoid it: a prompt longer
than the model's context window (and the window it names), or tools the server takes none of.

Each server words these its own way; the patterns below are the wordings of OpenAI, vLLM,
llama.cpp's server, llama-cpp-python, LM Studio, Ollama and text-generation-inference.
"""

import re

import openai

_READ_CHARS = 2000
"""What is read of a message: an error page of megabytes costs nothing much."""
OVERFLOW_STATUSES = (400, 413, 422, 500)
"""What servers answer a prompt longer than their window with (llama.cpp: 500 before late
2025, 400 since)."""
_WINDOW_NAMED = tuple(
    re.compile(pattern)
    for pattern in (
        r"maximum context length (?:is |of )?(\d{1,9})",  # OpenAI, vLLM
        r"(\d{1,9}) maximum context length",  # older vLLM: "... model with 2048 maximum ..."
        r"context (?:size|length|window) \((\d{1,9}) tokens?\)",  # llama.cpp
        r"context (?:size|length|window) (?:is |of )?(?:only )?(\d{1,9})",  # LM Studio...
        r"n_ctx\W{0,4}\d{1,9} ?> ?(\d{1,9})",  # "exceeds n_ctx: 2892 > 2048"
        r"\bn_ctx\s*[=:]\s*(\d{1,9})",
        r"max_new_tokens`? must be <= (\d{1,9})",  # text-generation-inference
    )
)
_OVERFLOW = re.compile(
    r"exceeds? (?:the )?(?:available |maximum )?context"
    r"|context_length_exceeded|exceed_context_size|context (?:size|length|window) exceeded"
)
TOOLS_STATUSES = (400, 404, 422, 500, 501)
_TOOLS_REFUSED = re.compile(
    r"(?:does not|doesn't|do not|cannot|can't) support (?:tools|tool|function)"
    r"|(?:tools|tool use|tool calling|tool calls|function calling|tool_choice|tool choice)"
    r"[^.]{0,40}?(?:not supported|unsupported|not enabled|not available|not allowed)"
    r"|unsupported param\w*:? ?['\"`]?(?:tools|tool_choice)"
    r"|tools? param\w* requires|tool choice requires|tool_choice requires"
    r"|--enable-auto-tool-choice|--tool-call-parser|--jinja"
)


def _error_of(exc: openai.APIStatusError) -> tuple[dict[str, object], str]:
    """The error object a refusal carries (empty if none) and its message, lower-cased."""
    body = exc.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    error = inner if isinstance(inner, dict) else {}
    message = error.get("message")
    text = message if isinstance(message, str) else str(exc.message)
    return error, text[:_READ_CHARS].lower()


def context_overflow(exc: openai.APIStatusError) -> tuple[bool, int | None]:
    """Whether a refusal says the prompt is longer than the model's context, and the window
    it names, if any: llama.cpp's `n_ctx` field, else the number its message gives."""
    if exc.status_code not in OVERFLOW_STATUSES:
        return False, None
    error, message = _error_of(exc)
    numbers = (match[1] for pattern in _WINDOW_NAMED if (match := pattern.search(message)))
    said = next(numbers, None)
    kinds = [str(error.get("type")), str(error.get("code"))]
    if said is None and not any(_OVERFLOW.search(text) for text in (message, *kinds)):
        return False, None
    named = error.get("n_ctx")
    if isinstance(named, int) and not isinstance(named, bool):
        return True, named
    return True, int(said) if said is not None else None


def rejects_tools(exc: openai.APIStatusError) -> bool:
    """Whether a refusal says the server takes no tools: llama.cpp's without `--jinja`, vLLM
    without a tool parser, Ollama for a model without tool support, and their kin."""
    if exc.status_code not in TOOLS_STATUSES:
        return False
    _, message = _error_of(exc)
    return _TOOLS_REFUSED.search(message) is not None
