"""Model layers: rotary frequencies against transformers, and TP-sharded weight loading."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RopeConfig,
    RotaryEmbedding,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
    rope_inv_freq,
)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    },
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_inv_freq_matches_hf(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(ROPES[name])
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512)
    cfg.rope_parameters = dict(params)
    hf_fn = ROPE_INIT_FUNCTIONS.get(name)
    ref = (
        hf_fn(cfg, "cpu")[0]
        if hf_fn
        else 1.0 / (params["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64))
    )
    rope = RopeConfig(
        rope_type=name,
        theta=params["rope_theta"],
        factor=params.get("factor", 1.0),
        low_freq_factor=params.get("low_freq_factor", 1.0),
        high_freq_factor=params.get("high_freq_factor", 4.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings", 512),
    )
    assert torch.equal(rope_inv_freq(64, rope, 512, 512), ref)


def test_rotary_cache_rows_are_cos_sin_of_position_times_freq():
    rope = RopeConfig()
    emb = RotaryEmbedding(16, rope, 64, 64, torch.float32, "cpu")
    cos, sin = emb.cos_sin(torch.tensor([0, 5]))
    freqs = 5 * rope_inv_freq(16, rope, 64, 64)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    torch.testing.assert_close(cos[1], freqs.cos())
    torch.testing.assert_close(sin[1], freqs.sin())


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        RopeConfig(rope_type="yarn")


def _f32(*shape):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(*shape)


def test_qkv_weight_loader_shards_heads():
    # 4 q heads, 2 kv heads, head_dim 2, hidden 3; rank 1 of 2 holds q heads 2-3, kv head 1
    layer = QKVParallelLinear(3, 2, 4, 2, True, torch.float32, "cpu", TPInfo(rank=1, size=2))
    assert layer.weight.shape == ((2 + 1 + 1) * 2, 3)
    q, k, v = _f32(8, 3), _f32(4, 3) + 100, _f32(4, 3) + 200
    for shard, w in (("q", q), ("k", k), ("v", v)):
        layer.weight.weight_loader(layer.weight, w, shard)
    assert torch.equal(layer.weight.data, torch.cat([q[4:], k[2:], v[2:]]))


def test_qkv_replicates_kv_heads_over_more_ranks():
    # MQA: 1 kv head over 2 ranks -> both ranks hold it
    layer = QKVParallelLinear(3, 2, 4, 1, False, torch.float32, "cpu", TPInfo(rank=1, size=2))
    k = _f32(2, 3)
    layer.weight.weight_loader(layer.weight, k, "k")
    assert torch.equal(layer.weight.data[4:6], k)


def test_merged_column_and_row_loaders():
    tp = TPInfo(rank=1, size=2)
    gate_up = MergedColumnParallelLinear(3, [4, 4], False, torch.float32, "cpu", tp)
    gate, up = _f32(4, 3), _f32(4, 3) + 50
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    assert torch.equal(gate_up.weight.data, torch.cat([gate[2:], up[2:]]))
    down = RowParallelLinear(4, 3, True, torch.float32, "cpu", tp)
    w = _f32(3, 4)
    down.weight.weight_loader(down.weight, w)
    assert torch.equal(down.weight.data, w[:, 2:])


def test_vocab_parallel_rows_and_shape_check():
    emb = VocabParallelEmbedding(5, 2, torch.float32, "cpu", TPInfo(rank=1, size=2))
    w = _f32(5, 2)
    emb.weight.weight_loader(emb.weight, w)
    assert torch.equal(emb.weight.data, torch.cat([w[3:], torch.zeros(1, 2)]))  # padded
    with pytest.raises(ValueError, match="shape mismatch"):
        emb.weight.weight_loader(emb.weight, _f32(6, 2))


def test_single_rank_layers_compute_plain_linear():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    head = ParallelLMHead(10, 6, torch.float32, "cpu")
    w = torch.randn(10, 6)
    head.weight.weight_loader(head.weight, w)
    torch.testing.assert_close(head.compute_logits(x), x @ w.T)
    row = RowParallelLinear(6, 3, True, torch.float32, "cpu")
    rw, rb = torch.randn(3, 6), torch.randn(3)
    row.weight.weight_loader(row.weight, rw)
    row.bias.weight_loader(row.bias, rb)
    torch.testing.assert_close(row(x), x @ rw.T + rb)
