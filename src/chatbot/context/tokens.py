"""Token counts with tiktoken, entirely offline.

tiktoken downloads its vocabularies on first use; this service ships them (see encodings/README.md)
and builds the encodings itself, so counting never touches the network. Models tiktoken does not
know (Llama, Gemini, Mistral...) are counted with o200k_base: an estimate, close enough to budget
a context with a margin. Should the bundled files be unusable, a stated fallback of one token per
four characters keeps the service running.
"""

import base64
import functools
import gzip
import hashlib
import logging
import math
from importlib.resources import files
from typing import Protocol

import tiktoken

logger = logging.getLogger(__name__)

FALLBACK_ENCODING = "o200k_base"
# Chat Completions frames every message with a few tokens, and primes the reply with three.
TOKENS_PER_MESSAGE = 4
REPLY_PRIMING_TOKENS = 3

# Pattern strings and special tokens as tiktoken_ext.openai_public defines them (MIT licence).
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_ENCODINGS: dict[str, tuple[str, str, dict[str, int]]] = {
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PATTERN,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


class Encoder(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class TiktokenEncoder:
    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.name = encoding.name
        self._encoding = encoding

    def count(self, text: str) -> int:
        # Special-token text in user content is counted as ordinary text, never rejected.
        return len(self._encoding.encode_ordinary(text))


class CharacterEstimate:
    """The fallback: about four characters a token, rounded up."""

    name = "estimate-4-chars"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4)


def _load_encoding(name: str) -> tiktoken.Encoding:
    expected_hash, pattern, special_tokens = _ENCODINGS[name]
    packed = files("chatbot.context").joinpath("encodings", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"bundled {name} does not match tiktoken's published hash")
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
    )


def encoding_name_for(model: str) -> str:
    """The encoding tiktoken assigns to a model, or the stated fallback for unknown models."""
    try:
        name = tiktoken.encoding_name_for_model(model.rsplit("/", 1)[-1])
    except KeyError:
        return FALLBACK_ENCODING
    return name if name in _ENCODINGS else FALLBACK_ENCODING


@functools.cache
def encoder(name: str) -> Encoder:
    """One encoder per vocabulary per process, built on first use (a fraction of a second)."""
    try:
        return TiktokenEncoder(_load_encoding(name))
    except Exception:
        logger.exception("cannot load the %s vocabulary; estimating 4 characters a token", name)
        return CharacterEstimate()


class TokenCounter:
    """Counts what a model will be sent, as Chat Completions frames it."""

    def encoder_for(self, model: str) -> Encoder:
        return encoder(encoding_name_for(model))

    def count_text(self, text: str, model: str) -> int:
        return self.encoder_for(model).count(text)

    def count_message(self, content: str, model: str) -> int:
        return self.count_text(content, model) + TOKENS_PER_MESSAGE
