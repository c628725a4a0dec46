"""CUDA-graph replay of uniform decode and verify-window steps equals eager execution
(float32, Triton backend, atol 1e-4). Needs a CUDA device and triton; the padding and
static-buffer logic is also tested on CPU in tests/kernels/test_triton_model.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from model_checkpoints import build_hf_model, run_step, save_checkpoint, tiny_config

from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq
from tandem.engine.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="CUDA graphs need a CUDA device and triton",
)


def _runner(model_dir, enforce_eager: bool) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=str(model_dir), dtype="float32", device="cuda", block_size=16,
            kv_cache_memory="4MiB", max_model_len=128, attention_backend="triton",
            enforce_eager=enforce_eager,
        )
    )  # fmt: skip


def test_graph_replay_matches_eager(tmp_path):
    model_dir = save_checkpoint(build_hf_model(tiny_config("LlamaForCausalLM")), tmp_path)
    runners = [_runner(model_dir, enforce_eager=e) for e in (False, True)]
    assert runners[0].graphs is not None and runners[1].graphs is None
    tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    prompts = [list(range(5, 5 + n)) for n in (20, 7, 33)]
    steps = [[RunSeq(p, 0, t, len(p) - 1) for p, t in zip(prompts, tables, strict=True)]]
    pos = [len(p) for p in prompts]
    for i in range(3):  # decodes: bucket 4, q 1
        steps.append([RunSeq([9 + i], pos[s] + i, tables[s], 0) for s in range(3)])
    steps.append([RunSeq([1, 2, 3], pos[s] + 3, tables[s], 0) for s in range(3)])  # windows
    steps.append([RunSeq([4], pos[0] + 6, tables[0], 0)])  # bucket 1
    for step in steps:
        graph, eager = (torch.cat(run_step(r, step)) for r in runners)
        torch.testing.assert_close(graph, eager, atol=1e-4, rtol=0)
    assert set(runners[0].graphs.graphs) == {(4, 1), (4, 3), (1, 1)}
