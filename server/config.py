"""The HTTP server's configuration: one frozen dataclass; CLI flags come from the fields."""

from __future__ import annotations

from dataclasses import dataclass, field

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LOG_FORMATS = ("text", "json")
TOOL_CALL_PARSERS = ("hermes", "json")  # the keys of tool_parsers.TOOL_PARSERS


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where and how the OpenAI-compatible server listens."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on (0 = any free)"})
    served_model_name: str | None = field(
        default=None,
        metadata={
            "help": "the model name clients send and responses report; default: "
            "tandem-shakespeare for the built-in model, else MODEL as given"
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "require `Authorization: Bearer KEY` on every route but /health and "
            "/metrics; default: the TANDEM_API_KEY environment variable, else no key"
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "chat template (Jinja) file or inline string; default: the model's"},
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={"help": "CORS origins allowed to call the API, comma-separated ('*' = any)"},
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata={
            "help": "seconds in-flight requests may take to finish after SIGTERM "
            "before they are aborted"
        },
    )
    log_level: str = field(default="info", metadata={"help": "|".join(LOG_LEVELS)})
    log_format: str = field(
        default="text",
        metadata={"help": "text | json (one JSON object per line, for log shippers)"},
    )
    disable_log_requests: bool = field(
        default=False,
        metadata={"help": "do not log one INFO line per finished request"},
    )
    disable_log_stats: bool = field(
        default=False,
        metadata={"help": "do not log engine statistics (throughput, queues, KV cache)"},
    )
    log_stats_interval: float = field(
        default=5.0, metadata={"help": "seconds between two engine statistics lines"}
    )
    max_request_body_bytes: int = field(
        default=8 << 20, metadata={"help": "larger request bodies get HTTP 413"}
    )
    tool_call_parser: str = field(
        default="hermes",
        metadata={
            "help": "how chat outputs are read as tool calls: hermes "
            '(<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one or more; the '
            "built-in model's format) | json (the whole output is a call or a list of them)"
        },
    )
    engine_process: bool = field(
        default=True,
        metadata={
            "help": "run the engine core in its own process, so its Python work never "
            "competes with the HTTP event loop for the GIL (served throughput: 0.9x+ of "
            "offline); --no-engine-process runs it in a thread of the server process"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds; got {self.shutdown_timeout}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ValueError(
                f"log_format must be one of {', '.join(LOG_FORMATS)}; got {self.log_format!r}"
            )
        if not self.log_stats_interval > 0:
            raise ValueError(
                f"log_stats_interval must be > 0 seconds; got {self.log_stats_interval}"
            )
        if self.max_request_body_bytes <= 0:
            raise ValueError(
                f"max_request_body_bytes must be > 0; got {self.max_request_body_bytes}"
            )
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}; "
                f"got {self.tool_call_parser!r}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be empty")
