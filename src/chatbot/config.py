"""Settings, read once from the environment and `.env`."""

import ipaddress
import re
from functools import cached_property
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatbot.ids import is_user_id

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./chatbot.db"


def normalize_database_url(url: str) -> str:
    """Accept the URLs people paste (`postgres://`, `sqlite:///`) and pick the async driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url.removeprefix("sqlite://")
    return url


class ConfigError(Exception):
    """A configuration the service refuses to start with."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


TOOLSET_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
"""A toolset's name: also the prefix of an MCP server's tool names, so short and plain."""


def check_toolset_name(name: str) -> str:
    if re.fullmatch(TOOLSET_NAME_PATTERN, name) is None:
        raise ValueError(f"{name!r} is not a toolset name ({TOOLSET_NAME_PATTERN})")
    return name


class McpServer(BaseModel):
    """An MCP server whose tools conversations may use: a command to start over stdio, or the
    URL of a streamable HTTP endpoint."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(default=None, min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    """Added to the environment the command starts with."""
    url: str | None = Field(default=None, pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every HTTP request (an API key the server wants, say)."""
    description: str = ""
    users: list[str] | None = None
    """The users whose conversations may name this toolset; unset, every user. The server is
    shared by all who may: one that keeps per-user data scopes it by the call's user."""

    @model_validator(mode="after")
    def _one_transport(self) -> "McpServer":
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs either a command or a url")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHATBOT_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "CHATBOT_DATABASE_URL"),
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    db_pool_timeout: float = Field(default=10.0, gt=0)
    db_connect_timeout: float = Field(default=5.0, gt=0)
    """PostgreSQL: how long opening a connection may take."""
    db_statement_timeout: float = Field(default=15.0, gt=0)
    """PostgreSQL: how long the service waits for any one statement's answer (a server that
    went silent, as in a network partition, answers 503 after this rather than never)."""
    auto_migrate: bool | None = None

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "CHATBOT_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL", "CHATBOT_OPENAI_BASE_URL")
    )
    model: str = "gpt-4o-mini"
    system_prompt: str = "You are a helpful assistant."
    upstream_timeout: float = Field(default=60.0, gt=0)
    upstream_connect_timeout: float = Field(default=10.0, gt=0)
    upstream_max_retries: int = Field(default=2, ge=0, le=10)
    upstream_max_connections: int = Field(default=1000, ge=1)
    request_timeout: float = Field(default=300.0, gt=0)
    demo_delay_ms: int = Field(default=35, ge=0)

    cancel_on_disconnect: bool = False
    stream_token_ttl: int = Field(default=900, ge=1)
    sse_ping_seconds: float = Field(default=15.0, gt=0)
    sse_send_timeout: float = Field(default=30.0, gt=0)
    checkpoint_seconds: float = Field(default=2.0, gt=0)
    stale_reply_seconds: float = Field(default=30.0, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    store_retry_seconds: float = Field(default=300.0, ge=0)
    """How long a finished reply is kept in memory and its store retried while the database
    cannot be reached; its conversation is freed when the store lands."""

    auth: Literal["jwt", "none"] | None = None
    jwt_secret: SecretStr | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_seconds: int = Field(default=30, ge=0)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long a connection may take to send a complete request head, from its opening or its
    previous response's end; then `chatbot serve` closes it. A running response is never timed."""
    max_connections: int = Field(default=1000, ge=1)
    """Open client connections per `chatbot serve` process. At the cap, the connection waiting
    longest for a request head is closed to let a new one in; with none waiting, new ones are
    refused. Each takes a file descriptor, and a running reply one more to the model provider."""
    log_level: str = "INFO"

    context_tokens: int | None = Field(default=None, ge=256)
    reply_reserve_tokens: int = Field(default=1024, ge=1)
    utility_model: str | None = None
    prompts_dir: str = "prompts"
    prompt_profile: str | None = None
    summary_words: int = Field(default=250, ge=20)
    chore_backoff_seconds: float = Field(default=30.0, ge=0)
    """After a title or summary failed for a conversation, how long until its chores are tried
    again (doubling with each failure in a row, up to an hour)."""

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "CHATBOT_REDIS_URL")
    )
    reply_lease_seconds: float = Field(default=5.0, gt=0)
    """With Redis: how long a running reply's producer may go unheard (its lease in Redis and
    its checkpoints in the database both lapsed) before another instance stores the reply
    `incomplete`, with the text Redis holds."""
    redis_reply_ttl_seconds: float = Field(default=300.0, gt=0)
    """With Redis: how long a reply's stream stays there once the reply ended (the database
    has it anyway)."""
    redis_flush_ms: float = Field(default=5.0, ge=0, le=1000)
    """With Redis: how long a producer gathers deltas before writing them in one round trip."""
    rate_limit: str = "120/minute"
    max_concurrent_replies: int = Field(default=4, ge=1)
    max_conversations: int = Field(default=100_000, ge=1)
    """Conversations one user may have; one more is 409 too_many_conversations."""
    max_streams_per_user: int = Field(default=20, ge=1)
    """Streams one user may have open in one process; following one more is 429."""
    max_tool_rounds: int = Field(default=5, ge=0, le=50)
    """Rounds of tool calls one reply may run; the call after the last is made with
    tool_choice=none, so the model answers in words."""
    default_toolsets: list[str] | None = None
    """The toolsets a conversation may use unless it names its own. Unset: none with a real
    model (tool definitions cost every call hundreds of tokens, and a model that cannot use
    them may claim it did), the task list with the offline demo model, which shows it off."""
    toolset_imports: list[str] = Field(default_factory=list)
    """Toolsets written in Python, as `package.module:NAME` of a `Toolset` (JSON list)."""
    mcp_servers: dict[str, McpServer] = Field(default_factory=dict)
    """MCP servers whose tools conversations may use, by toolset name (JSON)."""
    tool_timeout_seconds: float = Field(default=15.0, gt=0)
    tool_max_result_chars: int = Field(default=16_000, ge=100)
    stream_token_secret: SecretStr | None = None
    """Signs stream URLs when there is no JWT secret; set by `chatbot serve --workers` so that
    every worker accepts the others' (else each process has its own)."""
    mcp_token: SecretStr | None = None
    """`chatbot mcp` over stdio: the JWT of the user its tools act for (authentication on)."""
    mcp_port: int = Field(default=8001, ge=0, le=65535)
    """`chatbot mcp --http` listens here, on CHATBOT_HOST."""
    mcp_user: str = "local"
    """`chatbot mcp` over stdio with authentication off: the user its tools act for."""
    daily_token_quota: int | None = Field(default=None, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    cors_origins: list[str] = Field(default_factory=list)
    docs: bool = True

    max_message_chars: int = Field(default=32_000, ge=1)
    max_output_tokens: int = Field(default=16_384, ge=1)
    max_reply_chars: int = Field(default=400_000, ge=1)
    """The longest reply stored (all its rounds' text): past it the call to the model is closed
    and the reply stored `incomplete` with what fits, `finish_reason: "length"`."""
    history_messages: int = Field(default=50, ge=0)

    @field_validator("mcp_user")
    @classmethod
    def _user_id(cls, value: str) -> str:
        if not is_user_id(value):
            raise ValueError("1 to 255 printable characters, no space at either end")
        return value

    @field_validator("default_toolsets", "mcp_servers")
    @classmethod
    def _toolset_names(cls, value: list[str] | dict[str, McpServer] | None) -> object:
        for name in value or ():
            check_toolset_name(name)
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalize_database_url(value)

    @field_validator(
        "openai_base_url",
        "jwt_audience",
        "jwt_issuer",
        "utility_model",
        "prompt_profile",
        "redis_url",
    )
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("openai_api_key", "jwt_secret", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @cached_property
    def auth_mode(self) -> Literal["jwt", "none"]:
        """`jwt` once a secret is configured, `none` for a bare local start."""
        if self.auth is not None:
            return self.auth
        return "jwt" if self.jwt_secret is not None else "none"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def uses_demo_model(self) -> bool:
        return self.openai_api_key is None and self.openai_base_url is None

    @property
    def toolsets_by_default(self) -> list[str]:
        """CHATBOT_DEFAULT_TOOLSETS, or when unset what suits the model: see its field."""
        if self.default_toolsets is not None:
            return self.default_toolsets
        return ["tasks"] if self.uses_demo_model else []

    def check_startup(self) -> None:
        """Refuse configurations that would be unsafe to serve."""
        if self.redis_url and self.reply_lease_seconds <= self.checkpoint_seconds:
            raise ConfigError(
                "CHATBOT_REPLY_LEASE_SECONDS must be longer than CHATBOT_CHECKPOINT_SECONDS: "
                "live producers mark their replies alive at that pace"
            )
        if self.auth_mode == "jwt":
            secret = self.jwt_secret.get_secret_value() if self.jwt_secret else ""
            if len(secret) < 32:
                raise ConfigError("JWT authentication needs CHATBOT_JWT_SECRET of 32+ characters")
        if self.auth_mode == "none" and not is_loopback_host(self.host):
            raise ConfigError(
                f"authentication is off but CHATBOT_HOST={self.host} is not a loopback address; "
                "set CHATBOT_JWT_SECRET (or CHATBOT_AUTH=jwt) before listening on a network"
            )
