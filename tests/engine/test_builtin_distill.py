"""`train.py --distill-draft` retrains only the draft: target and tokenizer stay byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tandem.engine.builtin import BUILTIN_DIR
from tandem.engine.builtin.distill import distill_loss
from tandem.engine.builtin.train import main

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_distill_loss_is_kl_plus_label_loss():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert float(distill_loss(t, t.clone(), labels, 0.0)) == 0.0  # KL(p || p) = 0
    d = torch.zeros(2, 3)
    p = t.softmax(-1)
    kl = (p * (p.log() - d.log_softmax(-1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(d, labels)
    got = distill_loss(t, d, labels, 0.25)
    torch.testing.assert_close(got, 0.75 * kl + 0.25 * ce)


def test_distill_draft_rewrites_only_the_draft(tmp_path):
    text = (
        CORPUS.read_text()[:60_000]
        if CORPUS.exists()
        else (BUILTIN_DIR / "train.py").read_text() * 8
    )
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    common = ["--data", str(data), "--out", str(tmp_path), "--vocab-size", "400", "--batch", "2",
              "--seq", "32", "--val-tokens", "2000", "--eval-prompts", "2"]  # fmt: skip
    main([*common, "--target-steps", "3", "--draft-steps", "2"])
    target_before = _digests(tmp_path / "shakespeare-target")
    draft_dir = tmp_path / "shakespeare-draft"
    draft_before = _digests(draft_dir)
    old = json.loads((tmp_path / "metrics.json").read_text())
    main([*common, "--distill-draft", "--distill-steps", "3", "--greedy-rows", "4",
          "--greedy-len", "8"])  # fmt: skip
    assert _digests(tmp_path / "shakespeare-target") == target_before
    after = _digests(draft_dir)
    assert after["model.safetensors"] != draft_before["model.safetensors"]
    kept = (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    )
    for name in kept:
        if name in draft_before:
            assert after[name] == draft_before[name]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["target_val_loss"] == old["target_val_loss"]
    assert metrics["distill_args"]["distill_steps"] == 3
    assert 0.0 <= metrics["greedy_acceptance"] <= 1.0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(draft_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
