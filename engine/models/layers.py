"""Model building blocks, shaped for tensor parallelism.

Every layer takes a `TPInfo` (rank 0 of 1 today). Column-parallel layers split their
output features across ranks, row-parallel layers their input features (and sum the
partial outputs), vocab-parallel embeddings split the vocabulary. Each parameter has a
`weight_loader(param, loaded_weight[, shard_id])` that copies this rank's slice of a full
checkpoint tensor (converting dtype), so the loader never needs to know the sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.kernels import torch_ref as ops


@dataclass(frozen=True, slots=True)
class TPInfo:
    """This process's place in its tensor-parallel group."""

    rank: int = 0  # 0 .. size-1
    size: int = 1  # ranks sharing each layer


def divide(n: int, tp: TPInfo, what: str) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp.size}")
    return n // tp.size


def _param(shape: tuple[int, ...], dtype: torch.dtype, device, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    return p


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: model {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split along `out`: rank r holds rows r*out/tp ..."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device, tp=TPInfo()):
        super().__init__()
        self.tp = tp
        self.out_local = divide(out_features, tp, "output features")
        self.weight = _param((self.out_local, in_features), dtype, device, self.weight_loader)
        self.bias = _param((self.out_local,), dtype, device, self.weight_loader) if bias else None

    def _load_rows(self, param, loaded, dst_offset: int, size: int, src_offset: int) -> None:
        src = loaded.narrow(0, src_offset, size)
        dst = param.data.narrow(0, dst_offset, size)
        if dst.shape != src.shape:
            raise ValueError(
                f"shape mismatch: model {tuple(dst.shape)}, checkpoint {tuple(src.shape)}"
            )
        dst.copy_(src)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        self._load_rows(param, loaded, 0, self.out_local, self.tp.rank * self.out_local)

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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        self._load_rows(param, loaded, offset, size, self.tp.rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul: output (T, (Hq + 2 Hkv) D / tp)
    laid out [q | k | v]. KV heads are replicated when there are fewer than ranks."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, dtype, device, tp=TPInfo()):  # fmt: skip
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
        else:
            self.num_kv_heads = 1
            divide(tp.size, TPInfo(size=num_kv_heads), "tensor-parallel size over kv heads")
        self.head_dim = head_dim
        self.kv_group_ranks = max(1, tp.size // num_kv_heads)  # ranks sharing one kv head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden, out, bias, dtype, device, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        kv_rank = self.tp.rank // self.kv_group_ranks
        offset, size, src = {
            "q": (0, q, self.tp.rank * q),
            "k": (q, kv, kv_rank * kv),
            "v": (q + kv, kv, kv_rank * kv),
        }[shard_id]
        self._load_rows(param, loaded, offset, size, src)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split along `in`; partial outputs are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device, tp=TPInfo()):
        super().__init__()
        self.tp = tp
        self.in_local = divide(in_features, tp, "input features")
        self.weight = _param((out_features, self.in_local), dtype, device, self.weight_loader)
        self.bias = _param((out_features,), dtype, device, default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded.narrow(1, self.tp.rank * self.in_local, self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in/tp) -> (T, out)"""
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        dist.all_reduce(y)
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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shape mismatch: model ({self.vocab_size}, {param.shape[1]}), "
                f"checkpoint {tuple(loaded.shape)}"
            )
        n = max(0, min(self.rows, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:n].copy_(loaded[self.start : self.start + n])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) -> (T, hidden)"""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        dist.all_reduce(out)
        return out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits (its weight may be the embedding's)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (L, H) -> (L, V) float32"""
        logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
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
