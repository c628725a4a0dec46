"""Attention backends by name, imported lazily, with reasons when one cannot run.

Adding a backend is one entry in BACKENDS (name -> "module:Class") and, if it should be
picked by "auto", its name in AUTO_ORDER. Its class implements
tandem.kernels.types.AttentionBackend.
"""

from __future__ import annotations

import importlib
import logging
from types import MappingProxyType

import torch

from tandem.kernels.types import AttentionBackend

logger = logging.getLogger(__name__)

# name -> "module:Class", imported only when asked for (CUDA/NPU backends pull in
# triton / flash_attn / torch_npu, which a CPU machine does not have).
BACKENDS = MappingProxyType(
    {
        "torch": "tandem.kernels.torch_ref:TorchAttentionBackend",
    }
)
AUTO_ORDER = ("torch",)  # "auto" takes the first usable backend, fastest first


class BackendUnavailableError(ValueError):
    """The requested attention backend cannot run here; the message says why."""


def _import_backend(name: str) -> type[AttentionBackend]:
    module_name, _, cls_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def backend_unavailable_reasons(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int
) -> list[str]:
    """Why backend `name` cannot run with this device, dtype and head_dim ([] = it can)."""
    try:
        cls = _import_backend(name)
    except ImportError as e:
        return [f"cannot import {BACKENDS[name]}: {e}"]
    return cls.unavailable_reasons(device, dtype, head_dim)


def get_attention_backend(
    name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> AttentionBackend:
    """The backend class `name` ("auto" = first usable in AUTO_ORDER).

    Raises ValueError for an unknown name, BackendUnavailableError with the reasons
    when the named backend (or, for "auto", every backend) cannot run.
    """
    device = torch.device(device)
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
        )
    refusals = []
    for candidate in AUTO_ORDER if name == "auto" else (name,):
        reasons = backend_unavailable_reasons(candidate, device, dtype, head_dim)
        if not reasons:
            logger.info("attention backend: %s", candidate)
            return _import_backend(candidate)
        logger.info("attention backend %s refused: %s", candidate, "; ".join(reasons))
        refusals.append(f"{candidate}: {'; '.join(reasons)}")
    raise BackendUnavailableError(
        f"no usable attention backend for {name!r} on {device} with {dtype}, "
        f"head_dim {head_dim} ({' | '.join(refusals)})"
    )
