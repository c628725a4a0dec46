"""Loading checkpoints: sharded safetensors, and the one-line errors users see."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_checkpoints import build_hf_model, hf_logits, make_runner, run_step, tiny_config
from safetensors.torch import load_file, save_file

from tandem.engine.model_input import RunSeq
from tandem.engine.models.loader import eos_token_ids, resolve_model_dir
from tandem.engine.models.registry import ModelLoadError


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(tiny_config("LlamaForCausalLM"))


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    hf_model.save_pretrained(str(path), max_shard_size="40KB")
    return path


@pytest.fixture
def single_dir(hf_model, tmp_path):
    hf_model.save_pretrained(str(tmp_path / "m"))
    return tmp_path / "m"


def _load_error(model_dir, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as e:
        make_runner(model_dir, 4, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_config(model_dir, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_sharded_checkpoint_loads(hf_model, sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    runner = make_runner(sharded_dir, 4)
    prompt = list(range(3, 17))
    [logits] = run_step(runner, [RunSeq(prompt, 0, [0, 1, 2, 3], 0)])
    torch.testing.assert_close(logits, hf_logits(hf_model, prompt), atol=1e-4, rtol=0)


def test_missing_weight_file(sharded_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.unlink()
    msg = _load_error(broken)
    assert f"weight file {shard.name} listed in" in msg and "is missing" in msg


def test_missing_tensor(single_dir):
    path = single_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert _load_error(single_dir).endswith("lacks tensor(s): model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(single_dir):
    path = single_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'" in _load_error(single_dir)


def test_no_weights(single_dir):
    (single_dir / "model.safetensors").unlink()
    assert "no *.safetensors weights in" in _load_error(single_dir)


def test_unknown_architecture(single_dir):
    _edit_config(single_dir, architectures=["FooForCausalLM"])
    msg = _load_error(single_dir)
    assert "unsupported model architecture (FooForCausalLM)" in msg
    assert "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_unsupported_rope_scaling(single_dir):
    rope = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    _edit_config(single_dir, rope_parameters=rope, rope_scaling=rope)
    msg = _load_error(single_dir)
    assert "unsupported rope_scaling type 'yarn'" in msg and "llama3" in msg


def test_unsupported_activation(single_dir):
    _edit_config(single_dir, hidden_act="gelu")
    assert "hidden_act='gelu'" in _load_error(single_dir)


def test_missing_directory(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir("./not/a/dir")


def test_kv_cache_too_small_for_one_sequence(single_dir):
    from tandem.engine.config import EngineConfig
    from tandem.engine.model_runner import ModelRunner

    cfg = EngineConfig(model=str(single_dir), dtype="float32", device="cpu", kv_cache_memory=4096)
    with pytest.raises(ValueError, match="raise kv_cache_memory or lower max_model_len"):
        ModelRunner(cfg)


def test_max_model_len_above_model_limit(single_dir):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=128"):
        make_runner(single_dir, 4, max_model_len=129)


def test_runner_properties(single_dir):
    runner = make_runner(single_dir, 4, max_model_len=64)
    assert runner.vocab_size == 128 and runner.max_model_len == 64 and runner.block_size == 4
    assert runner.eos_token_ids == (2,)
    assert runner.model_dir == single_dir
    assert runner.num_blocks == (4 << 20) // (2 * 2 * 2 * 16 * 4 * 4)  # K+V, layers, heads, D
    assert len(runner.kv_caches) == 2


def test_eos_token_ids_list_from_generation_config(single_dir):
    (single_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert eos_token_ids(single_dir, None) == (2, 5)
    (single_dir / "generation_config.json").unlink()

    class Cfg:
        eos_token_id = 7

    assert eos_token_ids(single_dir, Cfg()) == (7,)
