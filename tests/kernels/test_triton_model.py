"""The Triton backend inside the model: ModelRunner(attention_backend="triton") against
the torch backend on tiny random checkpoints, and the CUDA-graph runner's static,
padded inputs — in Triton's interpreter on CPU (only where TRITON_INTERPRET=1; see
triton_interpreter.py).

Logits are compared in float32 with atol 1e-4 (the same bound as the torch backend
against transformers in tests/engine/test_model_equivalence.py).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import probe_interpreter, requires_interpreter

from tandem.engine.config import EngineConfig
from tandem.engine.cuda_graphs import CudaGraphRunner, cuda_graph_refusals
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.engine.model_runner import ModelRunner

pytestmark = requires_interpreter
ATOL = 1e-4
BLOCK_SIZE = 16


def _checkpoint(path, arch: str, **overrides):
    import transformers

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        architectures=[arch],
    )  # fmt: skip
    kwargs.update(overrides)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    probe_interpreter()
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return _checkpoint(path, "LlamaForCausalLM")
    return _checkpoint(path, "Qwen3ForCausalLM", head_dim=32, num_key_value_heads=1)


def _runner(model_dir, backend: str) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=str(model_dir), dtype="float32", device="cpu", block_size=BLOCK_SIZE,
            kv_cache_memory="2MiB", max_model_len=128, attention_backend=backend,
        )
    )  # fmt: skip


def _steps():
    """Two steps over blocks [3, 0, 5] and [7, 2]: prompts (one spans blocks), then a
    decode and a 4-token verify window over that context; logits at every token."""
    a, b = list(range(10, 31)), list(range(40, 47))
    first = [RunSeq(a, 0, [3, 0, 5], 0), RunSeq(b, 0, [7, 2], 0)]
    second = [RunSeq([99], 21, [3, 0, 5], 0), RunSeq([5, 6, 7, 8], 7, [7, 2], 0)]
    return [first, second]


def test_triton_runner_matches_torch_runner(model_dir):
    runners = {name: _runner(model_dir, name) for name in ("torch", "triton")}
    assert runners["triton"].backend.name == "triton"
    assert runners["triton"].graphs is None  # CPU: no CUDA graphs
    for step in _steps():
        logits = {
            name: r.execute(build_model_input(step, BLOCK_SIZE, "cpu"))
            for name, r in runners.items()
        }
        torch.testing.assert_close(logits["triton"], logits["torch"], atol=ATOL, rtol=0)


def test_graph_inputs_padded_to_a_bucket_give_the_eager_result(model_dir):
    """What a CUDA graph replays: the step copied into static buffers and padded with
    dummy sequences (slot -1) up to the bucket, under max_seq_len = max_model_len. Its
    hidden states equal the eager forward's, and the pads write no KV."""
    runner = _runner(model_dir, "triton")
    prompts = [RunSeq(list(range(3 + i, 20 + i)), 0, [2 * i, 2 * i + 1], 17) for i in range(3)]
    runner.execute(build_model_input(prompts, BLOCK_SIZE, "cpu"))
    windows = [RunSeq([7, 8], 17, [2 * i, 2 * i + 1], 0) for i in range(3)]  # 3 x (k+1=2)
    inp = build_model_input(windows, BLOCK_SIZE, "cpu")
    eager = runner.model(inp.input_ids, inp.positions, runner.kv_caches, inp.attn_meta)
    written = [c.clone() for c in runner.kv_caches]
    for cache in runner.kv_caches:
        cache[:, 6:] = float("nan")  # blocks no real sequence owns: pads must not touch them
    graphs = CudaGraphRunner(
        runner.model, runner.kv_caches, block_size=BLOCK_SIZE, max_model_len=128,
        device=torch.device("cpu"), batch_sizes=(2, 4), max_query_len=4,
    )  # fmt: skip
    key = graphs.key_for(inp)
    assert key == (4, 2)
    staged = runner.model(*graphs.stage(inp, key))
    assert staged.shape[0] == 8
    torch.testing.assert_close(staged[:6], eager, atol=1e-5, rtol=0)
    for before, after in zip(written, runner.kv_caches, strict=True):
        assert after[:, 6:].isnan().all()
        torch.testing.assert_close(after[:, :6], before[:, :6], atol=1e-5, rtol=0)


def test_graph_keys_only_for_uniform_steps(model_dir):
    runner = _runner(model_dir, "triton")
    graphs = CudaGraphRunner(
        runner.model, runner.kv_caches, block_size=BLOCK_SIZE, max_model_len=128,
        device=torch.device("cpu"), batch_sizes=(1, 2, 4), max_query_len=3,
    )  # fmt: skip

    def key(runs):
        seqs = [RunSeq([1] * n, start, [i, 10 + i], 0) for i, (start, n) in enumerate(runs)]
        return graphs.key_for(build_model_input(seqs, BLOCK_SIZE, "cpu"))

    assert key([(5, 1)]) == (1, 1)
    assert key([(5, 1), (9, 1), (3, 1)]) == (4, 1)
    assert key([(5, 3), (9, 3)]) == (2, 3)
    assert key([(5, 1), (9, 2)]) is None  # mixed run lengths
    assert key([(5, 4)]) is None  # window longer than captured
    assert key([(5, 1)] * 5) is None  # more sequences than the largest bucket
    assert cuda_graph_refusals(False, torch.device("cpu"), runner.backend) == [
        "device cpu is not CUDA"
    ]
