"""Attention backend selection on every platform, the KV layouts backends declare, and
the flash-attn / NPU call contracts (their library calls replaced by naive references
with the documented semantics, since neither library runs here)."""

from __future__ import annotations

import logging
import sys
import types
from types import MappingProxyType

import pytest
import torch

from tandem.engine.config import ATTENTION_BACKENDS, EngineConfig
from tandem.engine.cuda_graphs import cuda_graph_refusals
from tandem.engine.kv_cache import KVCacheSpec, allocate_kv_caches
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.kernels import flash_attn, npu, registry, torch_ref
from tandem.kernels.registry import (
    BackendUnavailableError,
    backend_unavailable_reasons,
    get_attention_backend,
)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
# torch.device("npu") parses only once torch_npu is imported; selection reads .type only
NPU = types.SimpleNamespace(type="npu", index=0)
BF16 = torch.bfloat16
HAS_TRITON = not backend_unavailable_reasons("triton", CUDA, BF16, 128, 16)


def pick(device, dtype=BF16, head_dim=128, block_size=16) -> str:
    return get_attention_backend("auto", device, dtype, head_dim, block_size).name


@pytest.fixture
def flash_installed(monkeypatch):
    monkeypatch.setattr(flash_attn, "module_installed", lambda name: True)


@pytest.fixture
def torch_npu_installed(monkeypatch):
    monkeypatch.setattr(npu, "module_installed", lambda name: True)


def test_config_choices_are_the_registry():
    assert ("auto", *registry.BACKENDS) == ATTENTION_BACKENDS
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch, triton"):
        EngineConfig(attention_backend="flashinfer")
    assert EngineConfig().enforce_eager is False


def test_cpu_auto_is_torch_and_triton_needs_cuda():
    assert pick(CPU) == pick(CPU, torch.float32, 64) == "torch"
    reasons = backend_unavailable_reasons("triton", CPU, BF16, 64, 16)
    if not HAS_TRITON:
        assert reasons[0].startswith("cannot import tandem.kernels.triton_attn")
    elif sys.modules["tandem.kernels.triton_attn"].INTERPRETED:  # under TRITON_INTERPRET=1
        assert reasons == []
    else:
        with pytest.raises(BackendUnavailableError, match="triton: needs a CUDA device"):
            get_attention_backend("triton", CPU, BF16, 64)
    with pytest.raises(BackendUnavailableError, match="flash_attn: needs a CUDA device"):
        get_attention_backend("flash_attn", CPU, BF16, 64, 256)
    with pytest.raises(BackendUnavailableError, match="npu: needs an NPU device"):
        get_attention_backend("npu", CPU, BF16, 64, 128)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_auto_prefers_flash_then_triton(flash_installed, caplog):
    caplog.set_level(logging.INFO, logger="tandem.kernels.registry")
    assert pick(CUDA, block_size=256) == "flash_attn"
    assert pick(CUDA, block_size=16) == "triton"
    assert "flash_attn refused: paged KV needs block_size a multiple of 256, got 16" in caplog.text
    assert pick(CUDA, torch.float32, block_size=256) == "triton"  # flash: fp16/bf16 only
    assert pick(CUDA, torch.float16, 80, 32) == "triton"
    assert pick(CUDA, BF16, 512, 256) == "torch"  # both refuse head_dim 512
    with pytest.raises(BackendUnavailableError, match="block_size a multiple of 256, got 16"):
        get_attention_backend("flash_attn", CUDA, BF16, 128, 16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_without_flash_attn_is_triton(monkeypatch):
    monkeypatch.setattr(flash_attn, "module_installed", lambda name: name != "flash_attn")
    assert backend_unavailable_reasons("flash_attn", CUDA, BF16, 128, 256) == [
        "flash_attn is not installed"
    ]
    assert pick(CUDA, block_size=256) == "triton"


def test_cuda_without_triton_is_torch(monkeypatch):
    backends = dict(registry.BACKENDS, triton="tandem.kernels.no_such_module:Backend")
    monkeypatch.setattr(registry, "BACKENDS", MappingProxyType(backends))
    (reason,) = backend_unavailable_reasons("triton", CUDA, BF16, 128, 16)
    assert reason.startswith("cannot import tandem.kernels.no_such_module:Backend")
    assert pick(CUDA) == "torch"


def test_npu_auto(torch_npu_installed):
    assert pick(NPU, BF16, 128, 128) == "npu"
    assert pick(NPU, torch.float16, 64, 16) == "npu"
    assert pick(NPU, torch.float32, 128, 128) == "torch"
    assert pick(NPU, BF16, 128, 8) == "torch"  # FIA pages are 16-aligned
    with pytest.raises(BackendUnavailableError, match="block_size a multiple of 16, got 8"):
        get_attention_backend("npu", NPU, BF16, 128, 8)


def test_npu_without_torch_npu_is_torch(monkeypatch):
    monkeypatch.setattr(npu, "module_installed", lambda name: False)
    assert "torch_npu is not installed" in backend_unavailable_reasons("npu", NPU, BF16, 128, 128)
    assert pick(NPU, BF16, 128, 128) == "torch"


def test_kernel_ops_and_graph_support():
    backends = {n: registry._import_backend(n) for n in ("torch", "flash_attn", "npu")}
    assert registry.kernel_ops(backends["torch"]) is torch_ref
    assert registry.kernel_ops(backends["npu"]) is torch_ref
    assert backends["flash_attn"].ops_module == "tandem.kernels.triton_ops"
    assert cuda_graph_refusals(True, CUDA, backends["flash_attn"]) == ["enforce_eager is set"]
    assert cuda_graph_refusals(False, CUDA, backends["flash_attn"]) == []
    assert cuda_graph_refusals(False, CUDA, backends["torch"]) == [
        "attention backend torch is not capturable"
    ]
    assert cuda_graph_refusals(False, CUDA, backends["npu"]) != []


@pytest.mark.parametrize(
    "name,shape",
    [("torch", (2, 5, 2, 16, 8)), ("npu", (2, 5, 2, 16, 8)), ("flash_attn", (2, 5, 16, 2, 8))],
)
def test_kv_cache_allocation_asks_the_backend_for_its_layout(name, shape):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=BF16, block_size=16)
    caches = allocate_kv_caches(spec, 5, registry._import_backend(name), CPU)
    assert len(caches) == 3 and all(c.shape == shape and c.dtype == BF16 for c in caches)


# --- call contracts, against naive references of the libraries' documented semantics ---

RUNS = [(9, 1), (0, 7), (13, 4), (40, 1), (3, 9)]  # decodes, prompt, verify window, chunk


def _naive(q, keys, values, scale):
    """One run of n queries at the end of L keys (bottom-right causal), GQA, float64."""
    n, num_heads, _ = q.shape
    group = num_heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    last = keys.shape[0] - n + torch.arange(n)
    scores = scores.masked_fill(torch.arange(keys.shape[0]) > last[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)


def _batch(block_size, num_kv_heads=2, num_heads=8, head_dim=16):
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(40, generator=g).tolist()
    seqs = [RunSeq([1] * n, s, [perm.pop() for _ in range(-(-(s + n) // block_size))], 0)
            for s, n in RUNS]  # fmt: skip
    meta = build_model_input(seqs, block_size, "cpu").attn_meta
    head_major = torch.randn(2, 40, num_kv_heads, block_size, head_dim, generator=g)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=g)
    return meta, head_major, q


def _gather(pages, table, length, block_size, token_major: bool):
    """(L, Hkv, D) keys of one sequence from (NB, BS, Hkv, D) or (NB, Hkv, BS, D) pages."""
    pos = torch.arange(length)
    blocks = table[pos // block_size].long()
    return pages[blocks, pos % block_size] if token_major else pages[blocks, :, pos % block_size]


def test_flash_attn_call_contract(monkeypatch):
    block_size = 16
    meta, head_major, q = _batch(block_size)
    token_major = head_major.transpose(2, 3).contiguous()  # the flash backend's layout
    calls = []

    def flash_attn_varlen_func(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale, causal, block_table):  # fmt: skip
        calls.append(1)
        assert causal and k.shape == v.shape == token_major.shape[1:]
        assert block_table.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        out = torch.empty_like(q)
        for b in range(block_table.shape[0]):
            q0, q1 = cu_seqlens_q[b].item(), cu_seqlens_q[b + 1].item()
            length = (cu_seqlens_k[b + 1] - cu_seqlens_k[b]).item()
            assert q1 - q0 <= max_seqlen_q and length <= max_seqlen_k
            keys = _gather(k, block_table[b], length, block_size, token_major=True)
            vals = _gather(v, block_table[b], length, block_size, token_major=True)
            out[q0:q1] = _naive(q[q0:q1], keys, vals, softmax_scale)
        return out

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    backend = flash_attn.FlashAttnBackend
    assert backend.kv_cache_shape(40, block_size, 2, 16) == token_major.shape
    prepared = backend.prepare(meta, token_major)
    assert prepared.backend_data.cu_seqlens_k.tolist() == [0, 10, 17, 34, 75, 87]
    out = backend.paged_attention(q, token_major, prepared, 0.25)
    ref = torch_ref.paged_attention(q, head_major, meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert calls == [1]


def test_npu_call_contract(monkeypatch):
    block_size = 16
    meta, head_major, q = _batch(block_size)
    k_new, v_new = torch.randn(2, meta.num_tokens, 2, 16).unbind(0)

    def npu_fused_infer_attention_score(query, key, value, *, atten_mask, block_table,
                                        actual_seq_lengths, actual_seq_lengths_kv, num_heads,
                                        num_key_value_heads, scale, input_layout, block_size,
                                        sparse_mode):  # fmt: skip
        assert input_layout == "TND" and sparse_mode == 3  # bottom-right causal
        assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        assert isinstance(actual_seq_lengths, list) and isinstance(actual_seq_lengths_kv, list)
        assert key.shape[1:] == (num_key_value_heads, block_size, query.shape[-1])
        assert query.shape[1] == num_heads and query.is_contiguous()
        out, start = torch.empty_like(query), 0
        for b, (end, length) in enumerate(
            zip(actual_seq_lengths, actual_seq_lengths_kv, strict=True)
        ):
            keys = _gather(key, block_table[b], length, block_size, token_major=False)
            vals = _gather(value, block_table[b], length, block_size, token_major=False)
            out[start:end] = _naive(query[start:end], keys, vals, scale)
            start = end
        return out, torch.zeros(1)

    fake = types.ModuleType("torch_npu")
    fake.npu_fused_infer_attention_score = npu_fused_infer_attention_score
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    backend = npu.NpuAttentionBackend
    cache = head_major.clone()
    prepared = backend.prepare(meta, cache)
    assert prepared.backend_data.query_ends == [1, 8, 12, 13, 22]
    assert prepared.backend_data.kv_lens == [10, 7, 17, 41, 12]
    backend.write_kv(k_new, v_new, cache, prepared)
    out = backend.paged_attention(q, cache, prepared, 0.25)
    torch_ref.write_kv(k_new, v_new, head_major, meta.slot_mapping)
    ref = torch_ref.paged_attention(q, head_major, meta, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
