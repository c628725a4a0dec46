"""Tensor parallelism on CPU: two gloo ranks (spawned processes) against one rank.

Tolerance: float32 logits of TP=2 and TP=1 differ only by summation order (the
row-parallel all-reduce adds two partial dot products instead of one long one), i.e. a
few float32 ulps per layer. Measured max |diff|: 7.6e-6 for the built-in model (10
layers, |logits| up to 18), 1.7e-6 for the tiny Llama (|logits| up to 3), so
atol=rtol=1e-4 leaves >10x margin while catching any sharding error (a wrong slice,
head or bias moves logits by >= 1e-2). Greedy tokens must be equal;
both ranks must compute bitwise-identical logits and tokens (the LM head is all-gathered,
and the sampler's noise depends only on (seed, position)).
"""

from __future__ import annotations

import pytest
import torch
from model_checkpoints import build_hf_model, save_checkpoint, tiny_config
from tp_harness import run_rank, run_tp

from tandem.engine.parallel import ParallelConfig
from tandem.engine.plan import SamplingParams

ATOL = RTOL = 1e-4


def _samplings(max_tokens: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
        SamplingParams(temperature=1.0, seed=7, max_tokens=max_tokens),
        SamplingParams(temperature=1.0, max_tokens=max_tokens),  # seed from config.seed
    ]


def _check(model_dir, prompts, kv_heads_per_rank: int, max_tokens: int = 6) -> None:
    samplings = _samplings(max_tokens)
    ref = run_rank(model_dir, prompts, samplings, ParallelConfig())
    assert not torch.distributed.is_initialized()  # world size 1 needs no process group
    ranks = run_tp(model_dir, prompts, samplings)
    for out in ranks:
        assert out.num_kv_heads == kv_heads_per_rank
    r0, r1 = ranks
    assert r0.num_blocks == r1.num_blocks
    assert r0.tokens == r1.tokens
    for a, b in zip(r0.logits, r1.logits, strict=True):
        assert torch.equal(a, b)
    assert r0.tokens[:2] == ref.tokens[:2]  # greedy
    for got, want in zip(r0.logits, ref.logits, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_tp2_builtin_model_matches_tp1():
    prompts = [[0, 17, 300, 45, 9], [0, 1000, 2000, 3000], [0, 5, 6], [0, 42]]
    _check(None, prompts, kv_heads_per_rank=1)


def test_tp2_qwen2_one_kv_head_tied_odd_vocab(tmp_path):
    config = tiny_config(
        "Qwen2ForCausalLM",
        vocab_size=127,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model_dir = save_checkpoint(build_hf_model(config, seed=1), tmp_path / "qwen2")
    prompts = [[3, 50, 126, 7, 8, 9, 10], [1, 2], [100, 101, 102], [126]]
    _check(str(model_dir), prompts, kv_heads_per_rank=1)  # the one KV head, replicated


def test_tp2_llama_six_heads_two_kv_sharded_checkpoint(tmp_path):
    config = tiny_config(
        "LlamaForCausalLM",
        vocab_size=129,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
    )
    model = build_hf_model(config, seed=2)
    model_dir = save_checkpoint(model, tmp_path / "llama", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    prompts = [[5, 6, 7, 128, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [64], [127, 128]]
    _check(str(model_dir), prompts, kv_heads_per_rank=1)


def test_parallel_config_rejects_bad_values():
    with pytest.raises(ValueError, match="init_method"):
        ParallelConfig(world_size=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        ParallelConfig(world_size=2, rank=2, init_method="tcp://127.0.0.1:1")
