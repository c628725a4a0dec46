"""The torch reference ops against naive per-sequence loops and transformers' formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.engine.model_input import RunSeq, build_model_input
from tandem.kernels import torch_ref as ops
from tandem.kernels.registry import BackendUnavailableError, get_attention_backend

# (start_pos, num_tokens) per sequence: decodes, a first prefill chunk, chunks with
# earlier context, k+1 verify windows; decodes and runs interleaved.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MIXED = [(9, 1), (0, 7), (13, 4), (5, 1), (0, 1), (20, 3), (30, 1), (3, 9)]


def _naive_attention(q, k_ctx, v_ctx, start_pos, scale):
    """One sequence, fp64: q (n, Hq, D) at positions start..start+n-1, k/v (L, Hkv, D)."""
    n, num_heads, _ = q.shape
    group = num_heads // k_ctx.shape[1]
    k = k_ctx.double().repeat_interleave(group, dim=1)  # (L, Hq, D)
    v = v_ctx.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(start_pos, start_pos + n)[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _setup(runs, block_size, num_heads, num_kv_heads, head_dim, seed=0, device="cpu"):
    """Random cache with earlier context, shuffled block tables, the step's q/k/v."""
    g = torch.Generator().manual_seed(seed)
    tables, seqs, ctx = [], [], []
    perm = torch.randperm(200, generator=g).tolist()
    for start, n in runs:
        num_blocks = -(-(start + n) // block_size) + 1  # one spare block, unused
        tables.append([perm.pop() for _ in range(num_blocks)])
        seqs.append(RunSeq(list(range(n)), start, tables[-1], n))
        ctx.append(
            (torch.randn(start + n, num_kv_heads, head_dim, generator=g),
             torch.randn(start + n, num_kv_heads, head_dim, generator=g))
        )  # fmt: skip
    cache = torch.randn(ops.kv_cache_shape(200, block_size, num_kv_heads, head_dim), generator=g)
    inp = build_model_input(seqs, block_size, device)
    cache = cache.to(device)
    # earlier context goes in through write_kv too, slot by slot of each sequence
    for (start, _), table, (k, v) in zip(runs, tables, ctx, strict=True):
        pos = torch.arange(start)
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        ops.write_kv(k[:start].to(device), v[:start].to(device), cache, slots.to(device))
    k_new = torch.cat([k[s:] for (s, _), (k, _) in zip(runs, ctx, strict=True)])
    v_new = torch.cat([v[s:] for (s, _), (_, v) in zip(runs, ctx, strict=True)])
    q = torch.randn(k_new.shape[0], num_heads, head_dim, generator=g)
    return cache, inp.attn_meta, q.to(device), k_new.to(device), v_new.to(device), ctx


CASES = [  # block_size, Hq, Hkv, D
    (4, 8, 2, 16),  # GQA
    (16, 8, 2, 64),
    (4, 4, 1, 64),  # MQA
    (16, 4, 1, 16),
    (16, 4, 4, 16),  # MHA
]


@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", CASES)
@pytest.mark.parametrize(
    "runs",
    [MIXED, [(9, 1), (40, 1), (2, 1)], [(0, 14)], [(4, 5), (0, 2), (17, 6)]],
    ids=["mixed", "decodes", "one-prefill", "runs"],
)
@pytest.mark.parametrize("prepared", [True, False])
def test_paged_attention_matches_naive(
    runs, block_size, num_heads, num_kv_heads, head_dim, prepared
):
    cache, meta, q, k_new, v_new, ctx = _setup(runs, block_size, num_heads, num_kv_heads, head_dim)
    if prepared:
        meta = ops.prepare(meta, cache)
    ops.write_kv(k_new, v_new, cache, meta.slot_mapping, meta.kv_write_rows)
    scale = head_dim**-0.5
    out = ops.paged_attention(q, cache, meta, scale)
    assert out.shape == q.shape
    offset = 0
    for (start, n), (k, v) in zip(runs, ctx, strict=True):
        ref = _naive_attention(q[offset : offset + n].cpu(), k, v, start, scale)
        torch.testing.assert_close(
            out[offset : offset + n].cpu().double(), ref, atol=1e-5, rtol=1e-5
        )
        offset += n


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_bfloat16_close_to_float32(device):
    cache, meta, q, k_new, v_new, _ = _setup(MIXED, 16, 8, 2, 64, device=device)
    ops.write_kv(k_new, v_new, cache, meta.slot_mapping)
    ref = ops.paged_attention(q, cache, meta, 0.125)
    out = ops.paged_attention(
        q.bfloat16(), cache.bfloat16(), ops.prepare(meta, cache.bfloat16()), 0.125
    )
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_write_kv_round_trip():
    block_size, num_kv_heads, head_dim = 4, 2, 16
    cache = torch.zeros(ops.kv_cache_shape(10, block_size, num_kv_heads, head_dim))
    slots = torch.tensor([0, 5, 39, 17, 6])
    k, v = torch.randn(5, num_kv_heads, head_dim), torch.randn(5, num_kv_heads, head_dim)
    ops.write_kv(k, v, cache, slots)
    for i, s in enumerate(slots.tolist()):
        block, off = divmod(s, block_size)
        assert torch.equal(cache[0, block, :, off], k[i])
        assert torch.equal(cache[1, block, :, off], v[i])
    assert int((cache != 0).any(-1).sum()) == 2 * 5 * num_kv_heads  # nothing else written


def test_rms_norm_matches_formula():
    x, w = torch.randn(6, 32), torch.randn(32)
    ref = w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref)
    res = torch.randn(6, 32)
    normed, new_res = ops.rms_norm_residual(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(normed, ops.rms_norm(x + res, w, 1e-6))
    xb = x.bfloat16()
    assert ops.rms_norm(xb, w.bfloat16(), 1e-6).dtype == torch.bfloat16


@pytest.mark.parametrize("head_dim", [16, 64])
def test_apply_rotary_matches_hf(head_dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=64)
    all_pos = torch.arange(64)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), all_pos)
    cache = torch.cat((cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]), dim=-1)
    positions = torch.tensor([3, 0, 63, 17, 17, 5])
    q, k = torch.randn(6, 4, head_dim), torch.randn(6, 2, head_dim)
    out_q, out_k = ops.apply_rotary(q, k, positions, cache)
    # HF: (B, H, T, D) with cos/sin (B, T, D)
    ref_q, ref_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, positions], sin[:, positions]
    )
    torch.testing.assert_close(out_q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(out_k, ref_k[0].transpose(0, 1))


def test_silu_and_mul_matches_formula():
    x = torch.randn(5, 2 * 24)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(x[:, :24]) * x[:, 24:])


def test_registry_auto_and_refusals():
    assert get_attention_backend("auto", "cpu", torch.float32, 64).name == "torch"
    assert get_attention_backend("torch", "cpu", torch.bfloat16, 16).name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*torch"):
        get_attention_backend("nope", "cpu", torch.float32, 64)
    with pytest.raises(BackendUnavailableError, match="torch: dtype torch.int8"):
        get_attention_backend("torch", "cpu", torch.int8, 64)
    with pytest.raises(BackendUnavailableError, match="head_dim must be even"):
        get_attention_backend("auto", "cpu", torch.float32, 15)
