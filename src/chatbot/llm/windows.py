"""How many tokens the model behind the endpoint holds: asked of its server where it can tell.

A local server's window is whatever it was started with (llama.cpp's `-c`, vLLM's
`--max-model-len`, Ollama's `num_ctx`), which no table of model names can know. So unless
CHATBOT_CONTEXT_TOKENS settles it, the window of a model behind a base URL other than OpenAI's
is asked of the server, on the same connection pool as the model calls, with the routes each
server kind answers; a window the server names in a rejection (`learn`) overrides them all;
the table of well-known hosted families and then a default come last. What a probe found is
kept per model for the process (refreshed now and then); a probe that found nothing is
remembered for a minute, so that a server without these routes is not asked at every turn.
Probes are short (2 s, all at once), read little, trust only sane numbers and never fail a
turn: anything else is "not known".
"""

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import httpx2

from chatbot.config import Settings
from chatbot.sanitize import strict_json, whole_number

logger = logging.getLogger(__name__)

HTTPClient = httpx.AsyncClient | httpx2.AsyncClient

DEFAULT_CONTEXT_WINDOW = 8_192
DEMO_CONTEXT_WINDOW = 128_000
"""The offline demo model has no window of its own: one that any message the service accepts
fits in."""
# Context windows of well-known hosted families, longest prefix first; others get the default.
_CONTEXT_WINDOWS = (
    ("gpt-4.1", 1_047_576),
    ("gpt-5", 400_000),
    ("gpt-4o", 128_000),
    ("gpt-4-turbo", 128_000),
    ("gpt-4", 8_192),
    ("gpt-3.5-turbo", 16_385),
    ("o1-mini", 128_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("gemini", 1_048_576),
    ("claude", 200_000),
)

MIN_WINDOW = 256
MAX_WINDOW = 2**24
"""What a server may claim: a number outside these bounds is no window (Llama 4 Scout's ten
million tokens fit)."""
PROBE_TIMEOUT = 2.0
MAX_PROBE_BYTES = 1 << 20
"""Ollama's `/api/show` carries the model's template and parameters: tens of kilobytes."""
FOUND_TTL = 600.0
"""How long a window a server named is trusted before it is asked again (a restarted server
may have another)."""
NOT_FOUND_TTL = 60.0
MAX_NEW_MODELS_PER_MINUTE = 8
"""Models never asked about that may be asked about in a minute; others get the table's window
until a later minute has room."""
MAX_MODELS = 1024
"""Models remembered: the model is the client's to choose, so what is kept is bounded."""
OLLAMA_DEFAULT_NUM_CTX = 4096
HOSTED_APIS = (
    "api.openai.com",
    "openai.azure.com",
    "generativelanguage.googleapis.com",
    "openrouter.ai",
    "api.groq.com",
    "api.together.xyz",
    "api.mistral.ai",
    "api.deepseek.com",
    "api.anthropic.com",
    "api.fireworks.ai",
)
"""Hosted APIs (and their subdomains): none answers the local servers' routes, so they are
never probed; their models' windows come from the table."""
# The order in which servers' answers are believed, should more than one route answer.
SERVER_KINDS = ("llama.cpp", "vllm", "ollama", "lmstudio")


@dataclass(frozen=True, slots=True)
class Window:
    tokens: int
    source: str
    """`setting`, `demo`, `learned`, `server:<kind>` (one of SERVER_KINDS), `table` or
    `default`."""


def window_count(value: object) -> int | None:
    """A window as a server sent it: a whole number within reason, else None (text, booleans,
    fractions, NaN, negatives, absurdly large)."""
    number = whole_number(value)
    if number is None or not MIN_WINDOW <= number <= MAX_WINDOW:
        return None
    return number


def table_window(model: str) -> Window:
    """The window of a well-known hosted family, else the default."""
    name = model.rsplit("/", 1)[-1].lower()
    for prefix, tokens in _CONTEXT_WINDOWS:
        if name.startswith(prefix):
            return Window(tokens, "table")
    return Window(DEFAULT_CONTEXT_WINDOW, "default")


def context_window(model: str) -> int:
    return table_window(model).tokens


# --- what each server kind says -----------------------------------------------------------------


def llama_cpp_window(props: object) -> int | None:
    """llama.cpp's `GET /props`: the context of one slot, which is what a request gets
    (`-c` divided among `--parallel` slots). `default_generation_settings.n_ctx` is that; a
    top-level `n_ctx` (some builds) is taken per slot when `total_slots` says there are
    several; with both, the smaller."""
    if not isinstance(props, dict):
        return None
    found = []
    settings = props.get("default_generation_settings")
    if isinstance(settings, dict) and (per_slot := window_count(settings.get("n_ctx"))):
        found.append(per_slot)
    if (total := window_count(props.get("n_ctx"))) is not None:
        slots = props.get("total_slots")
        if isinstance(slots, int) and not isinstance(slots, bool) and 1 < slots <= 4096:
            total = window_count(total // slots)
        if total is not None:
            found.append(total)
    return min(found, default=None)


def _entries(listing: object) -> list[dict[str, Any]]:
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    return [entry for entry in data[:1000] if isinstance(entry, dict)]


def _entry_for(listing: object, model: str) -> dict[str, Any] | None:
    """The listing's entry for `model`, or its only entry (a server serving one model answers
    under that name whatever it is asked)."""
    entries = _entries(listing)
    for entry in entries:
        if entry.get("id") == model:
            return entry
    return entries[0] if len(entries) == 1 else None


def vllm_window(listing: object, model: str) -> int | None:
    """vLLM's `GET /v1/models`: `max_model_len` of the model's entry (other servers list
    models there too, without it)."""
    entry = _entry_for(listing, model)
    return window_count(entry.get("max_model_len")) if entry else None


def lmstudio_window(listing: object, model: str) -> int | None:
    """LM Studio's `GET /api/v0/models`: the context the model is loaded with, if it is
    loaded, else the most it can hold."""
    entry = _entry_for(listing, model)
    if entry is None:
        return None
    loaded = window_count(entry.get("loaded_context_length"))
    return loaded or window_count(entry.get("max_context_length"))


_NUM_CTX = re.compile(r"^\s*num_ctx\s+(\d{1,9})\s*$", re.MULTILINE)


def ollama_window(shown: object) -> int | None:
    """Ollama's `POST /api/show`. Its OpenAI-compatible endpoint runs a model with `num_ctx`,
    whatever the model could hold: a `num_ctx` in the model's parameters (its Modelfile) if it
    sets one, else Ollama's default, which the API does not show (2,048 in old releases,
    4,096 later, and in recent ones chosen by the memory available; OLLAMA_CONTEXT_LENGTH on
    the server sets it): 4,096 is taken as a cautious guess. Never
    more than the model's own `<architecture>.context_length`. So the window is `num_ctx` if
    set, else the smaller of the model's length and 4,096. A server that picked a larger
    default is under-used, never overrun; one with a smaller default rejects nothing but cuts
    the prompt's start, which the learned window cannot catch."""
    if not isinstance(shown, dict):
        return None
    info = shown.get("model_info")
    parameters = shown.get("parameters")
    if not isinstance(info, dict) and not isinstance(parameters, str):
        return None  # not Ollama's answer
    if isinstance(parameters, str) and (match := _NUM_CTX.search(parameters[:100_000])):
        return window_count(int(match[1]))
    length = None
    if isinstance(info, dict):
        architecture = info.get("general.architecture")
        if isinstance(architecture, str):
            length = window_count(info.get(f"{architecture}.context_length"))
    return min(length or OLLAMA_DEFAULT_NUM_CTX, OLLAMA_DEFAULT_NUM_CTX)


# --- asking ------------------------------------------------------------------------------------


def probes_base_url(base_url: str | None) -> bool:
    """Whether a base URL may be a local or self-hosted server worth asking: not a hosted
    API's."""
    if base_url is None:
        return False
    host = (urlsplit(base_url).hostname or "").lower().rstrip(".")
    return not any(host == api or host.endswith("." + api) for api in HOSTED_APIS)


def server_root(base_url: str) -> str:
    """Where a server's own routes are: the base URL without its `/v1`."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1")


class ContextWindows:
    """The window of each model, as well as it can be known; see the module's docstring."""

    def __init__(
        self,
        settings: Settings,
        http: HTTPClient | None = None,
        *,
        demo: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._setting = settings.context_tokens
        self._demo = demo
        base_url = settings.openai_base_url
        self._http = http if probes_base_url(base_url) and not demo else None
        self._base_url = (base_url or "").rstrip("/")
        self._root = server_root(self._base_url)
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._clock = clock
        self._probed: OrderedDict[str, tuple[Window | None, float]] = OrderedDict()
        self._learned: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Windows servers named refusing a prompt, and until when they are believed."""
        self._probing: dict[str, asyncio.Task[Window | None]] = {}
        self._new_probes = (0, 0)
        """The minute, and how many models never asked about were asked about in it."""

    async def get(self, model: str) -> Window:
        """The window to plan `model`'s prompts with; never raises."""
        if self._setting is not None:
            return Window(self._setting, "setting")
        if self._demo:
            return Window(DEMO_CONTEXT_WINDOW, "demo")
        learned = self._learned.get(model)
        if learned is not None and learned[1] > self._clock():
            return Window(learned[0], "learned")
        if self._http is not None and (found := await self._server_window(model)) is not None:
            return found
        return table_window(model)

    def learn(self, model: str, tokens: int) -> Window | None:
        """The window a server named when it refused a prompt: believed over everything but
        the setting for FOUND_TTL (a server restarted with a larger window gets asked again).
        None when the number is not one to believe."""
        count = window_count(tokens)
        if count is None:
            return None
        learned = self._learned.get(model)
        if learned is None or learned[0] != count:
            logger.info("the model provider says %s holds %d tokens", model, count)
        _remember(self._learned, model, (count, self._clock() + FOUND_TTL))
        return Window(count, "learned")

    async def aclose(self) -> None:
        """Stop the probes under way (at shutdown)."""
        probes = list(self._probing.values())
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)

    async def _server_window(self, model: str) -> Window | None:
        known = self._probed.get(model)
        if known is not None and known[1] > self._clock():
            return known[0]
        probe = self._probing.get(model)
        if probe is None and known is None and not self._may_probe_new_model():
            return None  # too many new names this minute: the table, and asked another time
        if probe is None:
            # One probe per model at a time, whoever asks; a caller that gives up (its request
            # was cancelled) leaves it running for the others.
            probe = asyncio.create_task(self._probe(model), name=f"context-window-{model[:40]}")
            self._probing[model] = probe
            probe.add_done_callback(lambda _: self._probing.pop(model, None))
        if known is not None:
            return known[0]  # refreshed in the background: only a model's first turn waits
        try:
            return await asyncio.shield(probe)
        except asyncio.CancelledError:
            if probe.cancelled():  # shut down under us: not known, but the turn goes on
                return None
            raise
        except Exception:  # _probe catches everything; this is a last resort
            logger.exception("probing the context window of %s failed", model)
            return None

    def _may_probe_new_model(self) -> bool:
        """Whether a model never asked about may be asked about now. Model names are the
        client's to choose: without a bound, each new one would send the server four requests
        (and push the real model out of the cache)."""
        minute = int(self._clock() // 60)
        if minute != self._new_probes[0]:
            self._new_probes = (minute, 0)
        if self._new_probes[1] >= MAX_NEW_MODELS_PER_MINUTE:
            return False
        self._new_probes = (minute, self._new_probes[1] + 1)
        return True

    async def _probe(self, model: str) -> Window | None:
        answers = await asyncio.gather(
            self._ask(llama_cpp_window, "GET", f"{self._root}/props"),
            self._ask(lambda body: vllm_window(body, model), "GET", f"{self._base_url}/models"),
            self._ask(ollama_window, "POST", f"{self._root}/api/show", {"model": model}),
            self._ask(
                lambda body: lmstudio_window(body, model), "GET", f"{self._root}/api/v0/models"
            ),
        )
        found = next(
            (
                Window(tokens, f"server:{kind}")
                for kind, tokens in zip(SERVER_KINDS, answers, strict=True)
                if tokens is not None
            ),
            None,
        )
        previous = self._probed.get(model)
        known = previous[0] if previous else None
        if found is None:
            if known is None:
                logger.debug("the model provider names no context window for %s", model)
            # A server that named a window and is silent now (restarting, say) keeps it, and is
            # asked again a minute later; one that never named one (a hosted provider) is
            # asked a minute after the first probe, then every FOUND_TTL.
            ttl = NOT_FOUND_TTL if known is not None or previous is None else FOUND_TTL
            _remember(self._probed, model, (known, self._clock() + ttl))
            return known
        if found != known:
            logger.info("context window of %s: %d tokens (%s)", model, found.tokens, found.source)
        _remember(self._probed, model, (found, self._clock() + FOUND_TTL))
        return found

    async def _ask(
        self,
        read: Callable[[object], int | None],
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
    ) -> int | None:
        """One route's answer, read by `read`; None for anything but a sane one in time."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                payload = await self._fetch(method, url, body)
        except Exception as exc:  # refused, timed out, reset, not JSON...: not known
            # The route alone: a base URL may carry credentials.
            route = urlsplit(url).path
            logger.debug("context window probe %s %s: %s", method, route, type(exc).__name__)
            return None
        if payload is None:
            return None
        try:
            return read(payload)
        except (ValueError, TypeError, LookupError, AttributeError):
            return None

    async def _fetch(self, method: str, url: str, body: dict[str, Any] | None) -> object:
        """The JSON a route answers with 200, read to at most MAX_PROBE_BYTES; else None."""
        assert self._http is not None
        # identity: the bound below counts what is read, which compression would multiply.
        headers = {**self._headers, "Accept-Encoding": "identity"}
        stream = self._http.stream(method, url, headers=headers, json=body, timeout=PROBE_TIMEOUT)
        async with stream as response:
            if response.status_code != 200:
                return None
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_PROBE_BYTES:
                return None
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > MAX_PROBE_BYTES:
                    return None
        return strict_json(received.decode())


def _remember(cache: "OrderedDict[str, Any]", key: str, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_MODELS:
        cache.popitem(last=False)
