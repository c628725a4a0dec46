"""Tiny random Hugging Face checkpoints for model tests, and helpers to run Tandem on them.

Not a test module: imported by tests/engine/test_model_*.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.engine.model_runner import ModelRunner

INIT_STD = 0.08  # large enough that logits are not near-tied
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_config(arch: str, **overrides):
    """A transformers config for `arch` with tiny sizes (vocab 128, hidden 64, 2 layers)."""
    import transformers

    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=[arch],
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def build_hf_model(config, seed: int = 0):
    """A random HF model (float32, eval) with weights ~ N(0, INIT_STD), norms ~ 1 +- 0.1."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, INIT_STD)
    return model


def save_checkpoint(model, path: Path, **save_kwargs) -> Path:
    model.save_pretrained(str(path), **save_kwargs)
    return path


def make_runner(
    model_dir: Path, block_size: int, max_model_len: int = 128, device: str = "cpu"
) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=str(model_dir),
            dtype="float32",
            device=device,
            block_size=block_size,
            kv_cache_memory="4MiB",
            max_model_len=max_model_len,
        )
    )


class BlockAllocator:
    """Hands out fresh KV block ids so test sequences never share blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.next = 0
        self.num_blocks = num_blocks

    def take(self, n: int) -> list[int]:
        if self.next + n > self.num_blocks:
            raise RuntimeError("test ran out of KV blocks")
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def run_step(runner: ModelRunner, seqs: list[RunSeq]) -> list[torch.Tensor]:
    """Execute one step; the logits rows of each sequence, split back."""
    inp = build_model_input(seqs, runner.block_size, runner.device)
    logits = runner.execute(inp).cpu()
    starts = inp.logits_query_start
    return [logits[starts[i] : starts[i + 1]] for i in range(len(seqs))]


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF's full-forward logits (len, V) float32 on CPU for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([token_ids], device=model.device)).logits[0].float().cpu()
