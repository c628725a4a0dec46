"""The built-in Shakespeare model through Tandem's runner against transformers.

float32: logits at every position within atol 1e-4 and greedy tokens equal to HF
`generate`. bfloat16 (the CPU default where bf16 is native): greedy tokens equal to HF
running in bfloat16. Skipped only while the built-in model has not been trained yet.
"""

from __future__ import annotations

import pytest
import torch
from model_checkpoints import run_step

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq
from tandem.engine.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(
    not (BUILTIN_TARGET / "config.json").is_file(), reason=f"{BUILTIN_TARGET} not trained yet"
)
TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks? "
    "It is the east, and Juliet is the sun.\n\nJULIET:\n"
)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN_TARGET))
    ids = [tok.bos_token_id, *tok.encode(TEXT, add_special_tokens=False)]
    assert len(ids) > 32  # spans three blocks of 16
    return ids


def _hf(dtype):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(BUILTIN_TARGET), dtype=dtype).eval()


def _greedy(runner: ModelRunner, prompt: list[int], num_new: int) -> list[int]:
    table = list(range(-(-(len(prompt) + num_new) // runner.block_size)))
    tokens, run = list(prompt), RunSeq(prompt, 0, table, len(prompt) - 1)
    for _ in range(num_new):
        [logits] = run_step(runner, [run])
        tokens.append(int(logits[-1].argmax()))
        run = RunSeq(tokens[-1:], len(tokens) - 1, table, 0)
    return tokens[len(prompt) :]


def _hf_greedy(hf, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False, pad_token_id=2
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_builtin_matches_hf(prompt, dtype):
    runner = ModelRunner(EngineConfig(dtype=dtype, max_model_len=256, kv_cache_memory="8MiB"))
    assert runner.model_dir == BUILTIN_TARGET and runner.eos_token_ids
    hf = _hf(getattr(torch, dtype))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    table = list(range(3))
    rows = [  # the prompt in chunks of 16, 10 and the rest, each over the earlier ones
        run_step(runner, [RunSeq(prompt[lo:hi], lo, table, 0)])[0]
        for lo, hi in ((0, 16), (16, 26), (26, len(prompt)))
    ]
    atol = 1e-4 if dtype == "float32" else 0.1
    torch.testing.assert_close(torch.cat(rows), ref, atol=atol, rtol=0)
    hf_tokens = _hf_greedy(hf, prompt, 20)
    assert _greedy(runner, prompt, 20)[: len(hf_tokens)] == hf_tokens
