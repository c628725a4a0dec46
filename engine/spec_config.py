"""Speculative decoding configuration: one frozen dataclass, shared by both layers.

The engine reads the proposer fields (which draft model to load), the scheduler the
control fields (n-gram lookup, how k is chosen). Torch-free, like `plan.py`, so the
scheduler may import it. CLI flags come from the field helps; `from_vllm_json` takes
vLLM's `--speculative-config '{"method": ..., "model": ..., "num_speculative_tokens": N}'`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("draft", "ngram")
POLICIES = ("goodput", "fixed", "off")
# vLLM's method names for a separate draft model, and for prompt lookup
_VLLM_METHODS = {"draft": "draft", "draft_model": "draft", "ngram": "ngram", "[ngram]": "ngram"}
_VLLM_KEYS = {
    "method": "speculative_method",
    "model": "speculative_model",
    "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_min": "prompt_lookup_min",
    "prompt_lookup_max": "prompt_lookup_max",
    "policy": "speculation_policy",
    "dtype": "speculative_dtype",
}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """How drafts are proposed and how many each sequence gets per step."""

    speculative_method: str | None = field(
        default=None,
        metadata={
            "help": "draft proposer: draft (a small model, see --speculative-model) | ngram "
            "(prompt lookup); default: no speculation"
        },
    )
    speculative_model: str | None = field(
        default=None,
        metadata={
            "help": "draft model directory for --speculative-method draft; default: the "
            "built-in Shakespeare draft (only with the built-in target)"
        },
    )
    speculative_dtype: str = field(
        default="auto",
        metadata={
            "help": "draft model dtype: auto|float32|bfloat16|float16 (auto: the target's; "
            "measured in the serving loop on a 2-core CPU, the built-in draft's step costs "
            "0.97 ms in bfloat16 and 1.17 ms in float32: its weights are read cold after "
            "each target forward)"
        },
    )
    num_speculative_tokens: int = field(
        default=4,
        metadata={"help": "K: the most draft tokens any sequence gets in one step"},
    )
    prompt_lookup_min: int = field(
        default=2,
        metadata={"help": "shortest suffix n-gram the ngram proposer matches"},
    )
    prompt_lookup_max: int = field(
        default=4,
        metadata={"help": "longest suffix n-gram the ngram proposer tries first"},
    )
    speculation_policy: str = field(
        default="goodput",
        metadata={
            "help": "how k is chosen each step: goodput (per request, the k that maximises "
            "predicted tokens/s) | fixed (always K) | off (never speculate)"
        },
    )

    def __post_init__(self) -> None:
        m = self.speculative_method
        if m is not None and m not in METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(METHODS)}; got {m!r}")
        if self.speculation_policy not in POLICIES:
            raise ValueError(
                f"speculation_policy must be one of {', '.join(POLICIES)}; "
                f"got {self.speculation_policy!r}"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16]; got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max; got {lo} and {hi}")
        if self.speculative_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                "speculative_dtype must be auto, float32, bfloat16 or float16; "
                f"got {self.speculative_dtype!r}"
            )
        if self.speculative_model is not None and m != "draft":
            raise ValueError("speculative_model needs speculative_method 'draft'")

    @property
    def enabled(self) -> bool:
        """Whether any sequence may ever get drafts (a method, and a policy not off)."""
        return self.speculative_method is not None and self.speculation_policy != "off"

    @property
    def uses_draft_model(self) -> bool:
        """Whether the engine loads and runs a draft model."""
        return self.enabled and self.speculative_method == "draft"

    @property
    def uses_ngram(self) -> bool:
        """Whether the scheduler proposes n-gram drafts (they travel in the plan)."""
        return self.enabled and self.speculative_method == "ngram"

    @staticmethod
    def from_vllm_json(text: str, **overrides: Any) -> SpeculativeConfig:
        """A config from vLLM's `--speculative-config` JSON; `overrides` (field values
        given as separate flags) win. Raises ValueError naming the bad key.

        Example: `{"method": "ngram", "num_speculative_tokens": 3}` gives
        speculative_method="ngram", num_speculative_tokens=3, other fields default.
        """
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"speculative config must be a JSON object, got {text!r}")
        unknown = sorted(set(raw) - set(_VLLM_KEYS))
        if unknown:
            raise ValueError(
                f"speculative config has unknown keys {unknown}; known: {sorted(_VLLM_KEYS)}"
            )
        values = {_VLLM_KEYS[k]: v for k, v in raw.items()}
        method = values.get("speculative_method")
        if method is not None:
            if method not in _VLLM_METHODS:
                raise ValueError(
                    f"speculative config method {method!r} is not supported; "
                    f"use one of {sorted(_VLLM_METHODS)}"
                )
            values["speculative_method"] = _VLLM_METHODS[method]
        if values.get("speculative_model") and "speculative_method" not in values:
            values["speculative_method"] = "draft"
        values |= overrides
        names = {f.name for f in dataclasses.fields(SpeculativeConfig)}
        return SpeculativeConfig(**{k: v for k, v in values.items() if k in names})
