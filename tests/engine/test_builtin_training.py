"""The training script of the built-in pair runs end to end (a few steps, tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.engine.builtin import BUILTIN_DIR
from tandem.engine.builtin.train import main

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def test_training_script_runs_and_writes_loadable_models(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = CORPUS if CORPUS.exists() else None
    text = src.read_text()[:60_000] if src else (BUILTIN_DIR / "train.py").read_text() * 8
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    main([
        "--data", str(data), "--out", str(tmp_path), "--vocab-size", "400",
        "--target-steps", "3", "--draft-steps", "2", "--batch", "2", "--seq", "32",
        "--val-tokens", "2000", "--eval-prompts", "2",
    ])  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["greedy_acceptance"] <= 1.0
    assert metrics["draft_params"] < metrics["target_params"]
    for name in ("shakespeare-target", "shakespeare-draft"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        tok = AutoTokenizer.from_pretrained(tmp_path / name)
        assert model.config.vocab_size == len(tok)
        ids = tok.encode("ROMEO:")
        assert ids[0] == tok.bos_token_id  # encoding adds <|bos|>, as in training
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert chat.endswith("<|assistant|>\n")
