"""Which accelerator we run on (cpu / cuda / npu) and the defaults that follow from it."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

import torch

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags for native bf16 matmuls


@dataclass(frozen=True, slots=True)
class Platform:
    """The device one engine process runs on."""

    kind: str  # "cpu" | "cuda" | "npu"
    device: torch.device  # e.g. cpu, cuda:0, npu:0
    dist_backend: str  # torch.distributed backend: gloo | nccl | hccl


def npu_available() -> bool:
    """True when torch_npu is installed and sees a device (imported only if installed)."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises bf16 dot-product instructions (Linux; else False)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return False
    flags = set(text.split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    return npu_available()


def detect_platform(device: str = "auto") -> Platform:
    """The platform for a device string: "auto" (cuda, then npu, then cpu), "cpu",
    "cuda", "cuda:1", "npu", "npu:0". Raises ValueError when the device is absent."""
    if device == "auto":
        kind = next(k for k in ("cuda", "npu", "cpu") if _available(k))
        index = None if kind == "cpu" else 0
    else:
        kind, _, idx = device.partition(":")
        if kind not in DIST_BACKENDS:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda[:N] or npu[:N]")
        if not _available(kind):
            raise ValueError(f"device {device!r} requested but no {kind} device is available")
        index = int(idx) if idx else (None if kind == "cpu" else 0)
    dev = torch.device(kind) if index is None else torch.device(kind, index)
    return Platform(kind=kind, device=dev, dist_backend=DIST_BACKENDS[kind])


def resolve_dtype(name: str, platform: Platform, model_dtype: torch.dtype | None) -> torch.dtype:
    """The compute dtype for a config value ("auto" or a DTYPES key).

    auto on CPU: bfloat16 where the CPU has native bf16 instructions (measured 2.3x
    faster decode than float32 with avx512_bf16: 44 vs 102 ms for 64 seqs x 256
    context, hidden 512, 8 layers, vocab 32000, one thread), else float32. On GPU/NPU:
    the checkpoint's dtype (bfloat16 if it names none).
    """
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}")
        return DTYPES[name]
    if platform.kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if model_dtype in DTYPES.values():
        return model_dtype
    return torch.bfloat16
