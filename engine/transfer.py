"""Host tensors to the device, with or without waiting for the stream.

A plain host-to-device copy of pageable memory synchronises the stream: the host waits
for every kernel already queued. That is harmless when nothing is queued, and fatal to
overlapped decode (engine.lookahead), which queues the next step's inputs while the
current step still runs. non_blocking stages the tensor in pinned memory (torch's
caching host allocator keeps it until the copy is done) and copies asynchronously.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """t (on the host) on device; non_blocking on CUDA: without a stream sync."""
    if non_blocking and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
