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
EXECUTOR_BACKENDS = ("ray", "uni")


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
    overlap_decode: bool = field(
        default=False,
        metadata={
            "help": "queue each decode step's likely successor on the device before the "
            "step's tokens reach the host, so the host's per-step work overlaps the GPU's; "
            "a guess the next plan does not match is dropped (one GPU, no draft model; "
            "experimental: off until measured on a GPU)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for requests that do not set one"})
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op CPU threads; default: leave torch's setting"},
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "tensor-parallel ranks: the model is sharded over this many devices"},
    )
    distributed_executor_backend: str | None = field(
        default=None,
        metadata={
            "help": "ray|uni: ray runs one Ray actor per tensor-parallel rank, uni runs the "
            "model in this process (default: ray when --tensor-parallel-size > 1, else uni)"
        },
    )
    ray_address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join: auto or HOST:PORT (default: start a local one, "
            "stopped again on shutdown)"
        },
    )
    step_timeout_s: float = field(
        default=120.0,
        metadata={
            "help": "seconds a step on Ray workers may take before the engine is declared "
            "dead (in-flight requests fail, the server exits); collectives time out too"
        },
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
        self._check_parallel()
        if self.model is not None and not self.model.strip():
            raise ValueError("model must be a directory or hub id, or None for the built-in")

    def _check_parallel(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1; got {self.tensor_parallel_size}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}; "
                f"got {backend!r}"
            )
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                "distributed_executor_backend uni runs one rank in this process; "
                f"tensor_parallel_size={self.tensor_parallel_size} needs ray"
            )
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("ray_address must be auto or HOST:PORT (or unset: a local cluster)")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0; got {self.step_timeout_s}")

    @property
    def executor_backend(self) -> str:
        """The executor to build: "ray" or "uni" (the default follows the TP size)."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "ray" if self.tensor_parallel_size > 1 else "uni"

    @property
    def kv_cache_bytes(self) -> int:
        """kv_cache_memory as an int (strings like "4GiB" parsed)."""
        return parse_bytes(self.kv_cache_memory)
