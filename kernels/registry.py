"""Attention backends by name, imported lazily, with reasons when one cannot run.

Adding a backend is one entry in BACKENDS (name -> "module:Class") and, if "auto" should
pick it, its name in AUTO_ORDER for the platforms it serves. Its class implements
tandem.kernels.types.AttentionBackend, including the KV-cache layout it needs
(`kv_cache_shape`, which the engine's cache allocation asks for) and the module of the
model's other ops on its devices (`ops_module`, see kernel_ops).
"""

from __future__ import annotations

import importlib
import logging
from types import MappingProxyType, ModuleType

import torch

from tandem.kernels.types import AttentionBackend

logger = logging.getLogger(__name__)

# name -> "module:Class", imported only when asked for (CUDA/NPU backends pull in
# triton / flash_attn / torch_npu, which a CPU machine does not have).
BACKENDS = MappingProxyType(
    {
        "torch": "tandem.kernels.torch_ref:TorchAttentionBackend",
        "triton": "tandem.kernels.triton_attn:TritonAttentionBackend",
        "flash_attn": "tandem.kernels.flash_attn:FlashAttnBackend",
        "npu": "tandem.kernels.npu:NpuAttentionBackend",
    }
)
# device type -> what "auto" tries, fastest first. flash-attn 2 leads on CUDA where it
# can run (it refuses block sizes that are not multiples of 256); Triton runs any block
# size; the torch reference runs everywhere. On CPU the Triton kernels only run in the
# (slow) interpreter, so "auto" never picks them there.
AUTO_ORDER = MappingProxyType(
    {
        "cuda": ("flash_attn", "triton", "torch"),
        "npu": ("npu", "torch"),
        "cpu": ("torch",),
    }
)


class BackendUnavailableError(ValueError):
    """The requested attention backend cannot run here; the message says why."""


def _import_backend(name: str) -> type[AttentionBackend]:
    module_name, _, cls_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _as_device(device: torch.device | str) -> torch.device:
    # strings only: torch.device("npu") exists only once torch_npu is imported
    return torch.device(device) if isinstance(device, str) else device


def backend_unavailable_reasons(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int = 16
) -> list[str]:
    """Why backend `name` cannot run with this device, dtype, head_dim and KV block size
    ([] = it can)."""
    try:
        cls = _import_backend(name)
    except ImportError as e:
        return [f"cannot import {BACKENDS[name]}: {e}"]
    return cls.unavailable_reasons(_as_device(device), dtype, head_dim, block_size)


def get_attention_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int = 16,
) -> AttentionBackend:
    """The backend class `name` ("auto" = first usable in AUTO_ORDER[device.type]).

    Raises ValueError for an unknown name, BackendUnavailableError with the reasons
    when the named backend (or, for "auto", every candidate) cannot run. Refused "auto"
    candidates are logged with their reasons.
    """
    device = _as_device(device)
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
        )
    candidates = AUTO_ORDER.get(device.type, ("torch",)) if name == "auto" else (name,)
    refusals = []
    for candidate in candidates:
        reasons = backend_unavailable_reasons(candidate, device, dtype, head_dim, block_size)
        if not reasons:
            logger.info("attention backend: %s", candidate)
            return _import_backend(candidate)
        logger.info("attention backend %s refused: %s", candidate, "; ".join(reasons))
        refusals.append(f"{candidate}: {'; '.join(reasons)}")
    raise BackendUnavailableError(
        f"no usable attention backend for {name!r} on {device} with {dtype}, "
        f"head_dim {head_dim}, block_size {block_size} ({' | '.join(refusals)})"
    )


def kernel_ops(backend: AttentionBackend) -> ModuleType:
    """The module of the model's other ops (rms_norm, rms_norm_residual, rotate_neox,
    silu_and_mul; call-compatible with torch_ref) that go with `backend`."""
    return importlib.import_module(backend.ops_module)
