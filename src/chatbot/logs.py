"""What the service's log promises at any level, DEBUG included: no SQL parameters, no message
text, no keys. The service logs failures by kind and id; the libraries it uses are held to
levels where they do not print what they carry."""

import logging

QUIET_LIBRARIES = {
    # Every statement with its parameters (people's messages) at DEBUG.
    "aiosqlite": logging.INFO,
    # The options of every request, the conversation's messages among them, at DEBUG.
    "openai": logging.INFO,
    # Every event of every stream, deltas and all, at DEBUG.
    "sse_starlette": logging.INFO,
    # The provider's response headers (cookies, organisation ids) at DEBUG.
    "httpcore": logging.INFO,
    "httpcore2": logging.INFO,
    # Every request's URL at INFO: an MCP server's URL may carry its key, and the model
    # provider's requests are not news either. The MCP SDK logs session ids.
    "httpx": logging.WARNING,
    "httpx2": logging.WARNING,
    "mcp": logging.WARNING,
}


def quiet_libraries() -> None:
    for name, level in QUIET_LIBRARIES.items():
        library = logging.getLogger(name)
        if library.level < level:  # NOTSET (0) follows the root: DEBUG when it is
            library.setLevel(level)
