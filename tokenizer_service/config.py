"""The tokenizer service's configuration (one frozen dataclass; errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service_common.security import ChannelSecurity
from service_common.server import ServerConfig


@dataclass(frozen=True)
class TokenizerServiceConfig:
    model: Path                          # checkpoint directory (tokenizer.json + tokenizer_config.json)
    engine: str                          # the engine service's address, host:port
    host: str = "127.0.0.1"
    port: int = 50052                    # 0: pick a free port
    metrics_port: int = 0                # Prometheus /metrics port; 0: off
    engine_probe_interval_s: float = 2.0  # how often the engine's health is checked
    engine_probe_timeout_s: float = 1.0
    grace_s: float = 10.0                # on SIGTERM, running streams get this long to finish
    log_level: str = "INFO"
    log_format: str = "kv"               # "kv" (key=value) or "json"
    server: ServerConfig = field(default_factory=ServerConfig)  # limits, keepalive, TLS, API key
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
