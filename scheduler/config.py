"""The scheduler's configuration: one frozen dataclass; the CLI makes flags from its fields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How many requests run at once and how many tokens one step may compute."""

    max_num_seqs: int = field(
        default=256,
        metadata={"help": "Most requests running (holding KV blocks) at once."},
    )
    max_num_batched_tokens: int = field(
        default=2048,
        metadata={
            "help": "Token budget of one step: decode tokens + prefill chunk tokens + "
            "draft tokens. Long prompts are computed in chunks that fit what the "
            "running decodes leave."
        },
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={
            "help": "Reuse the KV blocks of identical prompt prefixes across requests "
            "(full blocks, matched by chained hashes and checked token by token)."
        },
    )
    max_queued_requests: int = field(
        default=1024,
        metadata={
            "help": "Most requests waiting for admission; beyond it new requests are "
            "refused (HTTP 429)."
        },
    )
    long_prefill_token_threshold: int = field(
        default=0,
        metadata={
            "help": "Most prompt tokens one request may compute in one step (0 = only "
            "the step's token budget limits it). Lower values let several prompts "
            "share a step."
        },
    )

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        threshold = self.long_prefill_token_threshold
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be an integer >= 0 (0 = off), got {threshold!r}"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
