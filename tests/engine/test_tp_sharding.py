"""Weight sharding: each TP rank's parameters are exactly its slices of the checkpoint
tensors, read slice by slice (no rank reads a whole sharded tensor). In-process: the
ranks are built for loading only (no process group is needed to load)."""

from __future__ import annotations

import pytest
import torch
from model_checkpoints import build_hf_model, save_checkpoint, tiny_config
from safetensors.torch import load_file

from tandem.engine.models import loader
from tandem.engine.models.layers import TPInfo
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.models.registry import ModelLoadError
from tandem.kernels.registry import get_attention_backend

TP = 2
CASES = {
    # name: (arch, config overrides, save kwargs)
    "qwen3_qk_norm_odd_vocab": ("Qwen3ForCausalLM", dict(vocab_size=127, head_dim=16), {}),
    "qwen2_bias_one_kv_tied": (
        "Qwen2ForCausalLM",
        dict(vocab_size=131, num_key_value_heads=1, tie_word_embeddings=True),
        {},
    ),
    "llama_6h_2kv_bias_sharded_files": (
        "LlamaForCausalLM",
        dict(
            vocab_size=129,
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
        ),
        dict(max_shard_size="40KB"),
    ),
}


def _build(hf_config, rank: int, size: int = TP) -> LlamaForCausalLM:
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    backend = get_attention_backend("torch", "cpu", torch.float32, head_dim, 4)
    return LlamaForCausalLM(
        hf_config,
        dtype=torch.float32,
        device="cpu",
        max_model_len=64,
        backend=backend,
        tp=TPInfo(rank=rank, size=size),
    )


def _full_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in loader.safetensors_files(model_dir):
        out.update(load_file(str(f)))
    return out


def _rows(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    return t[rank * n : (rank + 1) * n]


def _vocab_shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows [rank*ceil(V/TP), ...) of t, zero-padded to ceil(V/TP) rows."""
    rows = -(-t.shape[0] // TP)
    out = torch.zeros(rows, *t.shape[1:])
    part = t[rank * rows : (rank + 1) * rows]
    out[: part.shape[0]] = part
    return out


def _expected(full: dict[str, torch.Tensor], c, rank: int) -> dict[str, torch.Tensor]:
    """Our parameter name -> the slice of the full tensors rank `rank` must hold."""
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hq, hkv = c.num_attention_heads // TP, max(1, c.num_key_value_heads // TP)
    kv_rank = rank // max(1, TP // c.num_key_value_heads)
    exp = {}
    for name, t in full.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            exp[name] = _vocab_shard(t, rank)
        elif ".q_proj." in name:
            exp[name] = _rows(t, rank, hq * d)
        elif ".k_proj." in name or ".v_proj." in name:
            exp[name] = _rows(t, kv_rank, hkv * d)
        elif ".gate_proj." in name or ".up_proj." in name:
            exp[name] = _rows(t, rank, c.intermediate_size // TP)
        elif (".o_proj." in name or ".down_proj." in name) and name.endswith("weight"):
            exp[name] = t.chunk(TP, dim=1)[rank]
        else:  # norms, q/k norms, row-parallel biases: replicated
            exp[name] = t
    return _merge(exp)


MERGED = {".q_proj": ".qkv_proj", ".k_proj": ".qkv_proj", ".v_proj": ".qkv_proj",
          ".gate_proj": ".gate_up_proj", ".up_proj": ".gate_up_proj"}  # fmt: skip


def _merge(exp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours: q/k/v and gate/up slices concatenated in that order."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in exp.items():  # HF order in each file is not q, k, v: sort by part
        hf = next((h for h in MERGED if h in name), None)
        ours = name if hf is None else name.replace(hf, MERGED[hf])
        out.setdefault(ours, []).append((list(MERGED).index(hf) if hf else 0, t))
    return {
        n: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]) for n, parts in out.items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rank_holds_exactly_its_slices(tmp_path, case, monkeypatch):
    arch, overrides, save_kwargs = CASES[case]
    c = tiny_config(arch, **overrides)
    model_dir = save_checkpoint(build_hf_model(c, seed=3), tmp_path / case, **save_kwargs)
    full = _full_tensors(model_dir)
    read = []  # elements each narrow() call read from the files
    narrow = loader.LazyTensor.narrow

    def counting_narrow(self, dim, start, length):
        out = narrow(self, dim, start, length)
        read.append(out.numel())
        return out

    monkeypatch.setattr(loader.LazyTensor, "narrow", counting_narrow)
    for rank in range(TP):
        read.clear()
        model = _build(c, rank)
        loader.load_weights(model, model_dir)
        params = dict(model.named_parameters())
        expected = _expected(full, c, rank)
        assert sorted(params) == sorted(expected)
        for name, want in expected.items():
            assert torch.equal(params[name], want), name
        # Each rank reads its slices only: what it holds minus the vocab padding rows.
        vocab_params = [p for n, p in params.items() if "embed_tokens" in n or "lm_head" in n]
        rows = -(-c.vocab_size // TP)
        pad_rows = rows - max(0, min(rows, c.vocab_size - rank * rows))
        padding = sum(pad_rows * p.shape[1] for p in vocab_params)
        assert sum(read) == sum(p.numel() for p in params.values()) - padding
        assert sum(read) < sum(t.numel() for t in full.values())


def test_heads_not_divisible_by_tp_is_a_clear_error():
    c = tiny_config("LlamaForCausalLM", hidden_size=96, num_attention_heads=6)
    with pytest.raises(ModelLoadError, match="num_attention_heads=6 is not divisible by .* 4"):
        _build(c, 0, size=4)


def test_kv_heads_that_do_not_split_are_a_clear_error():
    c = tiny_config("LlamaForCausalLM", hidden_size=96, num_attention_heads=6,
                    num_key_value_heads=3)  # fmt: skip
    with pytest.raises(ModelLoadError, match="num_key_value_heads=3 cannot be split"):
        _build(c, 0, size=2)


def test_lazy_tensor_rejects_out_of_range_slices(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(12.0).reshape(3, 4)}, str(tmp_path / "m.safetensors"))
    for name, lazy in loader.iterate_weights([tmp_path / "m.safetensors"]):
        assert name == "w" and lazy.shape == (3, 4)
        assert torch.equal(lazy.narrow(1, 1, 2), torch.arange(12.0).reshape(3, 4)[:, 1:3])
        with pytest.raises(ValueError, match="outside"):
            lazy.narrow(1, 2, 3)
