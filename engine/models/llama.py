"""The Llama family in one module: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

Config switches (see LlamaArgs.from_hf): GQA/MQA, any head_dim, q/k/v (and o) bias,
per-head q/k RMSNorm (Qwen3), tied or untied embeddings, rope_theta and rope_scaling
default/linear/llama3/dynamic. Sliding-window attention (Mistral v0.1, Qwen with
use_sliding_window) is not implemented: every layer attends to the full context, which
matches HF for sequences up to the window and is logged as a warning otherwise.

The forward takes one flattened step (prefill chunks, decodes and verify windows alike):
    forward(input_ids (T,), positions (T,), kv_caches [L x cache], attn_meta) -> (T, H)
    compute_logits(hidden (N, H)) -> (N, V) float32
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tandem.engine.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
)
from tandem.engine.models.registry import ModelLoadError
from tandem.kernels.registry import kernel_ops
from tandem.kernels.types import AttentionBackend, AttnMetadata

logger = logging.getLogger(__name__)

# (our merged parameter, HF checkpoint part, shard id)
STACKED_PARAMS = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


def _rope_config(c: Any) -> RopeConfig:
    """RopeConfig from transformers 5 `rope_parameters` or 4.x `rope_scaling`/`rope_theta`."""
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    if params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) != 1.0:
        raise ModelLoadError("unsupported config value: partial_rotary_factor != 1")
    rope_type = params.get("rope_type", params.get("type", "default"))
    try:
        return RopeConfig(
            rope_type=rope_type,
            theta=float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", c.max_position_embeddings)
            ),
        )
    except ValueError as e:
        raise ModelLoadError(f"unsupported config value: {e}") from None


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    """What the model needs from a Hugging Face config, checked once."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA: a divisor of num_heads; MQA: 1)
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool  # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before rotary (Qwen3)

    @classmethod
    def from_hf(cls, c: Any) -> LlamaArgs:
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported config value: hidden_act={act!r} (only silu)")
        num_heads = c.num_attention_heads
        num_kv_heads = getattr(c, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        model_type = getattr(c, "model_type", "llama")
        attention_bias = bool(getattr(c, "attention_bias", False))
        is_qwen2 = model_type == "qwen2"
        _warn_sliding_window(c)
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            rope=_rope_config(c),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )


def _warn_sliding_window(c: Any) -> None:
    window = getattr(c, "sliding_window", None)
    if getattr(c, "model_type", "") in ("qwen2", "qwen3"):
        window = window if getattr(c, "use_sliding_window", False) else None
    if window:
        logger.warning(
            "sliding_window=%s is ignored: every layer attends to the full context "
            "(identical to HF up to %s tokens)",
            window,
            window,
        )


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, backend: AttentionBackend, dtype, device, tp: TPInfo):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads, a.qkv_bias, dtype, device, tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = a.head_dim
        self.o_proj = RowParallelLinear(
            a.num_heads * a.head_dim, a.hidden_size, a.o_bias, dtype, device, tp
        )
        self.kernels = kernels = kernel_ops(backend)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, dtype, device, kernels)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, dtype, device, kernels)
        self.qk_norm = a.qk_norm
        self.scale = a.head_dim**-0.5
        self.backend = backend

    def forward(self, x, cos, sin, kv_cache, meta: AttnMetadata):
        """x (T, H), cos/sin (T, D/2) -> (T, H). Writes this step's K/V into kv_cache."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        rotate = self.kernels.rotate_neox
        fused = self.backend.rotate_and_write_kv
        if fused is not None and not self.qk_norm:  # rotary and the KV write: one kernel
            q = fused(qkv.view(t, hq + 2 * hkv, d), hq, cos, sin, kv_cache, meta)
            out = self.backend.paged_attention(q, kv_cache, meta, self.scale)
            return self.o_proj(out.reshape(t, hq * d))
        if self.qk_norm:
            q = rotate(self.q_norm(qkv[:, : hq * d].view(t, hq, d)), cos, sin)
            k = rotate(self.k_norm(qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)), cos, sin)
        else:  # q and k are adjacent in qkv: one rotary call for both
            qk = rotate(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        self.backend.write_kv(k, v, kv_cache, meta)
        out = self.backend.paged_attention(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, hq * d))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, dtype, device, tp: TPInfo, kernels):
        super().__init__()
        self.kernels = kernels
        inter = a.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            a.hidden_size, [inter, inter], a.mlp_bias, dtype, device, tp
        )
        self.down_proj = RowParallelLinear(inter, a.hidden_size, a.mlp_bias, dtype, device, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, backend: AttentionBackend, dtype, device, tp: TPInfo):
        super().__init__()
        kernels = kernel_ops(backend)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype, device, kernels)
        self.self_attn = LlamaAttention(a, backend, dtype, device, tp)
        self.post_attention_layernorm = RMSNorm(
            a.hidden_size, a.rms_norm_eps, dtype, device, kernels
        )
        self.mlp = LlamaMLP(a, dtype, device, tp, kernels)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """(x, residual) (T, H) each -> (mlp output, residual before the mlp). The
        residual adds are fused into the next norm; residual is None at layer 0."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs, backend, dtype, device, max_len: int, tp: TPInfo):
        super().__init__()
        self.backend = backend
        self.embed_tokens = VocabParallelEmbedding(a.vocab_size, a.hidden_size, dtype, device, tp)
        self.rotary = RotaryEmbedding(
            a.head_dim, a.rope, a.max_position_embeddings, max_len, dtype, device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(a, backend, dtype, device, tp) for _ in range(a.num_layers)
        )
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype, device, kernel_ops(backend))

    def forward(self, input_ids, positions, kv_caches, meta: AttnMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions)  # once per step, shared by all layers
        meta = self.backend.prepare(meta, kv_caches[0])  # once per step, for all layers
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over a paged KV cache (one rank of a TP group).

    With tp.size > 1 the attention heads, MLP width and vocabulary are split over the
    ranks (see layers.py); forward's output (T, H) and compute_logits' (N, V) are the
    full, identical tensors on every rank. num_kv_heads is per rank."""

    def __init__(self, hf_config: Any, *, dtype: torch.dtype, device: torch.device | str,
                 max_model_len: int, backend: AttentionBackend, tp: TPInfo = TPInfo()):  # fmt: skip
        super().__init__()
        self.args = a = LlamaArgs.from_hf(hf_config)
        try:
            self.model = LlamaModel(a, backend, dtype, device, max_model_len, tp)
        except ValueError as e:  # a size that does not split over the TP ranks
            if tp.size == 1:
                raise
            raise ModelLoadError(f"cannot shard the model over {tp.size} ranks: {e}") from None
        self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, dtype, device, tp)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        attn = self.model.layers[0].self_attn
        self.num_kv_heads = attn.num_kv_heads  # per rank
        self.head_dim = a.head_dim
        self.num_layers = a.num_layers

    def forward(self, input_ids, positions, kv_caches, attn_meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions (T,) int64 -> final-normed hidden states (T, H)."""
        return self.model(input_ids, positions, kv_caches, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V) float32."""
        return self.lm_head.compute_logits(hidden)

    def checkpoint_names(self) -> set[str]:
        """The HF tensor names this model needs from a checkpoint."""
        names = set()
        for name, _ in self.named_parameters():
            parts = [name.replace(p, hf) for p, hf, _ in STACKED_PARAMS if p in name]
            names.update(parts or [name])
        return names

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copy this rank's slice of HF-named tensors into the parameters (merging q/k/v
        and gate/up); returns the names consumed. A weight is a torch.Tensor or a lazy
        view (loader.LazyTensor: `.shape`, `.narrow`), of which only the slice is read.
        Raises ModelLoadError for unknown names or bad shapes."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target, shard = self._target(name)
            if target not in params:
                raise ModelLoadError(
                    f"unexpected tensor {name!r} in checkpoint (unsupported variant?)"
                )
            param = params[target]
            try:
                if shard is None:
                    param.weight_loader(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard)
            except ValueError as e:
                raise ModelLoadError(f"cannot load tensor {name!r}: {e}") from None
            loaded.add(name)
        return loaded

    @staticmethod
    def _target(name: str) -> tuple[str, str | int | None]:
        for param, hf, shard in STACKED_PARAMS:
            if hf in name:
                return name.replace(hf, param), shard
        return name, None
