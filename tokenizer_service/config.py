"""The tokenizer service's configuration (frozen dataclasses; errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from service_common.options import (
    DEFAULT_GRACE_S,
    DEFAULT_HOST,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    TOKENIZER_PORT,
    LogFormat,
)
from service_common.security import ChannelSecurity
from service_common.server import ServerConfig


def _limit(default: int, help: str) -> int:
    """A request limit: its default and the ``--help`` text of its command-line option."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold, checked before any per-item work (tokenizing, parsing, rendering).

    Each limit is a command-line option (``--max-text-bytes`` for ``max_text_bytes``, ...); a request
    beyond one is answered INVALID_ARGUMENT naming the field and the limit. Sizes are UTF-8 bytes.
    """

    max_text_bytes: int = _limit(
        1 << 20,
        "text to tokenize: Tokenize.text, Complete.prompt, each chat message's content and the "
        "chat's total (content, reasoning, tool-call arguments, tool definitions)",
    )
    max_chat_messages: int = _limit(1024, "messages in one chat")
    max_tools: int = _limit(128, "tools offered in one chat, and tool calls in one message")
    max_tool_json_bytes: int = _limit(
        64 << 10, "one tool's parameters_json or description, one tool call's arguments_json"
    )
    max_json_depth: int = _limit(64, "nesting depth of tool JSON (objects and arrays)")
    max_stop_strings: int = _limit(16, "stop strings per request")
    max_stop_bytes: int = _limit(256, "one stop string")
    max_request_id_bytes: int = _limit(256, "a request_id")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_tool_json_bytes > self.max_text_bytes:
            raise ValueError(
                f"max_tool_json_bytes ({self.max_tool_json_bytes}) must not exceed "
                f"max_text_bytes ({self.max_text_bytes})"
            )


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model: Path  # checkpoint directory (tokenizer.json + tokenizer_config.json)
    engine: str  # the engine service's address, host:port
    host: str = DEFAULT_HOST
    port: int = TOKENIZER_PORT  # 0: pick a free port
    metrics_port: int = 0  # Prometheus /metrics port; 0: off
    engine_probe_interval_s: float = 2.0  # how often the engine's health is checked
    engine_probe_timeout_s: float = 1.0
    grace_s: float = DEFAULT_GRACE_S  # on SIGTERM, running streams get this long to finish
    log_level: str = DEFAULT_LOG_LEVEL
    log_format: LogFormat = DEFAULT_LOG_FORMAT  # "kv" (key=value) or "json"
    server: ServerConfig = field(default_factory=ServerConfig)  # limits, keepalive, TLS, API key
    limits: RequestLimits = field(default_factory=RequestLimits)
    engine_security: ChannelSecurity = field(default_factory=ChannelSecurity)  # TLS / key to reach the engine

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        if not self.model.is_dir():
            raise ValueError(f"model: {self.model} is not a directory")
        host, sep, port = self.engine.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"engine: expected host:port, got {self.engine!r}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("engine_probe_interval_s", "engine_probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.log_format not in ("kv", "json"):
            raise ValueError(f"log_format must be 'kv' or 'json', got {self.log_format!r}")
