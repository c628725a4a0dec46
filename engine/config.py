"""The engine's configuration: one frozen dataclass; CLI flags come from the field helps."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
# kept equal to tandem.kernels.registry.BACKENDS (a test checks), so that this module,
# which the CLI reads, imports no torch
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn", "npu")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|npu)(:\d+)?$")


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string like "4GiB", "512 MiB", "2e9", "1.5GB".

    >>> parse_bytes("4GiB")
    4294967296
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a byte count, got {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot parse {value!r} as a byte count (examples: 1073741824, 512MiB, 4GiB, 2GB)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to run the model. Every field has a default; the CLI help is `metadata["help"]`."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "local Hugging Face model directory or hub id; "
            "default: the built-in Shakespeare model"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights and activations dtype: auto|float32|bfloat16|float16 "
            "(auto: the model's dtype on GPU/NPU; on CPU bfloat16 where it has native bf16 "
            "instructions, else float32)"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto|cpu|cuda[:N]|npu[:N] (auto: best available)"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_cache_memory: int | str = field(
        default=1 << 30,
        metadata={"help": "bytes for the KV cache, e.g. 1073741824 or 4GiB"},
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "max tokens per sequence (prompt + output); "
            "default: the model's max_position_embeddings"
        },
    )
    attention_backend: str = field(
        default="auto",
        metadata={
            "help": "attention kernels: auto|torch|triton|flash_attn|npu (auto: the fastest "
            "usable on this device for the dtype, head_dim and block_size; refusals are logged)"
        },
    )
    enforce_eager: bool = field(
        default=False,
        metadata={
            "help": "never replay CUDA graphs (by default decode steps and verify windows "
            "are captured per batch-size bucket and window length on CUDA)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for requests that do not set one"})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op CPU threads; default: leave torch's setting"},
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda[:N] or npu[:N]; got {self.device!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0; got {self.block_size}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes; got {self.kv_cache_memory!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0; got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads must be > 0; got {self.num_threads}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if self.model is not None and not self.model.strip():
            raise ValueError("model must be a directory or hub id, or None for the built-in")

    @property
    def kv_cache_bytes(self) -> int:
        """kv_cache_memory as an int (strings like "4GiB" parsed)."""
        return parse_bytes(self.kv_cache_memory)
