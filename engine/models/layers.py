"""Model building blocks, shaped for tensor parallelism.

Every layer takes a `TPInfo` (its rank, the group size, and the group that carries the
collectives). Column-parallel layers split their output features across ranks,
row-parallel layers their input features (and all-reduce the partial outputs, adding
the bias once, after the reduce), vocab-parallel embeddings split the vocabulary in
ceil(V/tp) rows per rank (the last shard zero-padded). Each parameter has a
`weight_loader(param, loaded[, shard_id])` that copies this rank's slice of one
checkpoint tensor (converting dtype), so the loader never needs to know the sharding.
`loaded` is a torch.Tensor or anything with `.shape` and `.narrow(dim, start, length)
-> Tensor` (the loader's lazy safetensors view, which reads only the requested slice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.parallel import TPGroup
from tandem.kernels import torch_ref as ops


@dataclass(frozen=True, slots=True)
class TPInfo:
    """This process's place in its tensor-parallel group."""

    rank: int = 0  # 0 .. size-1
    size: int = 1  # ranks sharing each layer
    group: TPGroup | None = None  # the collectives; None: size 1, or building for loading only

    @classmethod
    def of(cls, group: TPGroup) -> TPInfo:
        return cls(rank=group.rank, size=group.world_size, group=group)

    def _require_group(self) -> TPGroup:
        if self.group is None:
            raise RuntimeError(f"tensor-parallel size {self.size} needs a TPGroup to run")
        return self.group

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks in place (identity at size 1)."""
        return t if self.size == 1 else self._require_group().all_reduce(t)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's t along dim (identity at size 1)."""
        return t if self.size == 1 else self._require_group().all_gather(t, dim)


def divide(n: int, tp: TPInfo, what: str) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp.size}")
    return n // tp.size


def read_all(loaded: Any) -> torch.Tensor:
    """The whole of a checkpoint tensor (a torch.Tensor as is; a lazy view read fully)."""
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded.narrow(0, 0, loaded.shape[0])


def _param(shape: tuple[int, ...], dtype: torch.dtype, device, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    return p


def default_weight_loader(param: nn.Parameter, loaded: Any) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch: model {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(read_all(loaded))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split along `out`: rank r holds rows r*out/tp ..."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device, tp=TPInfo()):
        super().__init__()
        self.tp = tp
        self.out_local = divide(out_features, tp, "output features")
        self.weight = _param((self.out_local, in_features), dtype, device, self.weight_loader)
        self.bias = _param((self.out_local,), dtype, device, self.weight_loader) if bias else None

    def _load_rows(self, param, loaded, dst_offset: int, size: int, src_offset: int,
                   full_rows: int) -> None:  # fmt: skip
        """Copy checkpoint rows [src_offset, +size) into param rows [dst_offset, +size);
        the checkpoint tensor must have full_rows rows (the unsharded size)."""
        dst = param.data.narrow(0, dst_offset, size)
        shape = tuple(loaded.shape)
        if shape[0] != full_rows or shape[1:] != tuple(dst.shape[1:]):
            raise ValueError(
                f"shape mismatch: model {(full_rows, *dst.shape[1:])}, checkpoint {shape}"
            )
        dst.copy_(loaded.narrow(0, src_offset, size))

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        n = self.out_local
        self._load_rows(param, loaded, 0, n, self.tp.rank * n, n * self.tp.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out/tp)"""
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (e.g. gate|up).

    Output (T, sum(output_sizes)/tp), each projection's local slice in order;
    weight_loader's shard_id is the projection's index."""

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool, dtype, device, tp=TPInfo()
    ):
        self.output_sizes = [divide(n, tp, "output features") for n in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, dtype, device, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: int) -> None:
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        self._load_rows(param, loaded, offset, size, self.tp.rank * size, size * self.tp.size)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul: output (T, (hq + 2 hkv) D) per
    rank, laid out [q | k | v], hq = Hq/tp and hkv = max(1, Hkv/tp) local heads.

    Rank r holds query heads [r*hq, (r+1)*hq) and the KV heads they attend to: with
    Hkv >= tp, heads [r*hkv, (r+1)*hkv); with Hkv < tp (tp a multiple of Hkv), one KV
    head, r // (tp/Hkv), replicated on the tp/Hkv ranks whose queries use it.
    Example: Hq=4, Hkv=1, tp=2: rank 0 q heads 0-1, rank 1 q heads 2-3, both kv head 0.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, dtype, device, tp=TPInfo()):  # fmt: skip
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={num_kv_heads} cannot be split over tensor-parallel "
                f"size {tp.size}: one must be a multiple of the other"
            )
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.total_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_group_ranks = max(1, tp.size // num_kv_heads)  # ranks sharing one kv head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, dtype, device, tp)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        kv_rank = self.tp.rank // self.kv_group_ranks
        kv_rows = self.total_kv_heads * self.head_dim
        offset, size, src, full = {
            "q": (0, q, self.tp.rank * q, q * self.tp.size),
            "k": (q, kv, kv_rank * kv, kv_rows),
            "v": (q + kv, kv, kv_rank * kv, kv_rows),
        }[shard_id]
        self._load_rows(param, loaded, offset, size, src, full)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split along `in`; partial outputs are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device, tp=TPInfo()):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.in_local = divide(in_features, tp, "input features")
        self.weight = _param((out_features, self.in_local), dtype, device, self.weight_loader)
        self.bias = _param((out_features,), dtype, device, default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        shape = tuple(loaded.shape)
        if len(shape) != 2 or shape[0] != param.shape[0] or shape[1] != self.in_features:
            raise ValueError(
                f"shape mismatch: model ({param.shape[0]}, {self.in_features}), checkpoint {shape}"
            )
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.in_local, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in/tp) -> (T, out); the bias is added once, after the all-reduce."""
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embeddings with the vocabulary split in contiguous ranges of ceil(V/tp) rows
    (the last range zero-padded)."""

    def __init__(self, vocab_size: int, hidden: int, dtype, device, tp=TPInfo()):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows
        self.weight = _param((self.rows, hidden), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        shape = tuple(loaded.shape)
        if shape[0] != self.vocab_size or shape[1:] != tuple(param.shape[1:]):
            raise ValueError(
                f"shape mismatch: model ({self.vocab_size}, {param.shape[1]}), checkpoint {shape}"
            )
        n = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.zero_()  # padding rows of the last shard stay zero
        if n:
            param.data[:n].copy_(loaded.narrow(0, self.start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) -> (T, hidden)"""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)  # ids of other ranks' shards give zeros
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits (its weight may be the embedding's)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (L, H) -> (L, V) float32, identical on every rank: each rank's
        (L, ceil(V/tp)) slice is all-gathered, and the padding columns cut off."""
        logits = self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[:, : self.vocab_size].float()


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, replicated on every rank. `kernels`: the op module
    (torch_ref or a fused one, see tandem.kernels.registry.kernel_ops)."""

    def __init__(self, hidden: int, eps: float, dtype, device, kernels=ops):
        super().__init__()
        self.eps = eps
        self.weight = _param((hidden,), dtype, device, default_weight_loader)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x (..., H) -> normed; with residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.rms_norm_residual(x, residual, self.weight, self.eps)


ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary position embedding parameters (HF `rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"  # one of ROPE_TYPES
    theta: float = 10000.0  # base wavelength
    factor: float = 1.0  # context extension factor (linear, llama3, dynamic)
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only: pretraining length

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 frequency smoothing, as transformers' _compute_llama3_parameters."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(head_dim: int, rope: RopeConfig, max_position: int, max_len: int):
    """(head_dim/2,) float32 inverse frequencies, computed with the same float32 ops as
    transformers so positions rotate identically.

    dynamic (NTK): HF rescales the base from each batch's longest sequence once it passes
    max_position; here the base is fixed for max_len (as vLLM does), so results match HF
    exactly while max_len <= max_position.
    """
    base = rope.theta
    if rope.rope_type == "dynamic" and max_len > max_position:
        scale = rope.factor * max_len / max_position - (rope.factor - 1)
        base = base * scale ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed (max_len, D) [cos | sin] cache."""

    def __init__(self, head_dim: int, rope: RopeConfig, max_position: int, max_len: int,
                 dtype, device):  # fmt: skip
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope, max_position, max_len)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin, each (T, D/2); computed once per step."""
        return self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
