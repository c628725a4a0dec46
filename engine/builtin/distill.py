"""Distil the built-in draft from the shipped target (`train.py --distill-draft`).

The target and the tokenizer stay byte-identical; only the draft's weights (and its
config.json) and the draft figures of metrics.json are rewritten. The draft learns the
target's soft labels, KL(target || draft), optionally mixed with the hard-label loss,
on two kinds of rows per step:

- windows of the training corpus (the same plain/chat mix `train.py` builds), so the
  draft follows the target on any text (sampled requests);
- the target's own greedy continuations of corpus prompts, generated once before
  training: the contexts a greedy request's drafts are verified in, where the draft's
  argmax must equal the target's.

    python -m tandem.engine.builtin.train --distill-draft --distill-steps 160 --batch 8 \
        --greedy-rows 256 --lr 1e-3        # the shipped draft: 8.5 min on 2 loaded cores

The draft starts from the shipped draft's weights when its sizes match `train.DRAFT`
(continued training), else from a fresh init whose embeddings (and final norm) are the
target's (same hidden size) or random. Only the draft's model.safetensors and
config.json are written; greedy acceptance before and after goes to metrics.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def load_models(out: Path, draft_sizes: dict):
    """(tokenizer, target, draft) in float32; the draft is the shipped one when its
    sizes match draft_sizes, else fresh (embeddings and final norm from the target
    when the hidden sizes agree)."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(out / "shakespeare-target")
    target = LlamaForCausalLM.from_pretrained(out / "shakespeare-target", dtype=torch.float32)
    target.eval().requires_grad_(False)
    shipped = LlamaForCausalLM.from_pretrained(out / "shakespeare-draft", dtype=torch.float32)
    if all(getattr(shipped.config, k) == v for k, v in draft_sizes.items()):
        return tok, target, shipped
    cfg = shipped.config
    for k, v in draft_sizes.items():
        setattr(cfg, k, v)
    draft = LlamaForCausalLM(cfg)
    if cfg.hidden_size == target.config.hidden_size:
        draft.model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight)
        draft.model.norm.weight.data.copy_(target.model.norm.weight)
    return tok, target, draft


def greedy_rows(target, stream: list[int], n: int, prompt_len: int, gen: int, rng):
    """-> (n, prompt_len + gen) int64 tensor: corpus prompts and the target's greedy continuations."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    rows = []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, n, 64):
            starts = [rng.randrange(0, len(data) - prompt_len) for _ in range(min(64, n - i))]
            prompts = torch.stack([data[s : s + prompt_len] for s in starts])
            # an explicit mask: prompts may hold <|bos|>, which generate() would
            # otherwise take for padding (id 0)
            mask = torch.ones_like(prompts)
            rows.append(target.generate(prompts, attention_mask=mask, max_new_tokens=gen,
                                        min_new_tokens=gen, do_sample=False))  # fmt: skip
    print(f"[distill] {n} greedy continuations in {time.time() - t0:.0f}s", flush=True)
    return torch.cat(rows)


def distill_loss(t_logits, d_logits, labels, hard_weight: float):
    """(1 - hard_weight) * KL(target || draft) + hard_weight * CE(labels), per token.

    t_logits, d_logits: (N, V); labels: (N,) int64."""
    import torch.nn.functional as F

    t_logp = F.log_softmax(t_logits.float(), -1)
    d_logp = F.log_softmax(d_logits.float(), -1)
    kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
    if hard_weight == 0:
        return kl
    return (1 - hard_weight) * kl + hard_weight * F.nll_loss(d_logp, labels)


def distill_batches(corpus: list[int], greedy, args, rng):
    """Yields (x, y) pairs alternating corpus windows (batch x seq) and greedy rows."""
    import torch

    data = torch.tensor(corpus, dtype=torch.long)
    n_greedy = max(1, args.batch * args.seq // greedy.shape[1])
    while True:
        starts = [rng.randrange(0, len(data) - args.seq - 1) for _ in range(args.batch)]
        x = torch.stack([data[s : s + args.seq + 1] for s in starts])
        yield x[:, :-1], x[:, 1:]
        g = greedy[[rng.randrange(len(greedy)) for _ in range(n_greedy)]]
        yield g[:, :-1], g[:, 1:]


def train_draft(target, draft, corpus: list[int], greedy, args, rng):
    """Minimise distill_loss for args.distill_steps AdamW steps (warm-up, cosine)."""
    import torch

    from tandem.engine.builtin.train import set_lr

    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps, warmup = args.distill_steps, min(50, args.distill_steps // 10 + 1)
    it = distill_batches(corpus, greedy, args, rng)
    t0 = time.time()
    draft.train()
    for step in range(steps):
        lr = set_lr(opt, args.lr, step, steps, warmup)
        x, y = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():
                t_logits = target(input_ids=x).logits
            d_logits = draft(input_ids=x).logits
        loss = distill_loss(t_logits.flatten(0, 1), d_logits.flatten(0, 1), y.flatten(),
                            args.hard_weight)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"[distill] step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
    draft.eval()
    return draft


def save_draft(draft, out: Path) -> None:
    """Rewrites the draft's weights and config; its tokenizer files and generation
    config stay byte-identical."""
    import torch

    gen_config = out / "generation_config.json"
    kept = gen_config.read_bytes() if gen_config.exists() else None
    draft.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    draft.to(torch.float32)
    if kept is not None:
        gen_config.write_bytes(kept)


def distill(args: argparse.Namespace, draft_sizes: dict) -> dict:
    """Runs the distillation described in the module docstring; returns the metrics
    written to metrics.json (the target's figures kept from the previous run)."""
    import torch

    from tandem.engine.builtin import train

    torch.manual_seed(args.seed)
    out = Path(args.out)
    text = Path(args.data).read_text()
    cut = int(len(text) * 0.9)
    rng = random.Random(args.seed)
    tok, target, draft = load_models(out, draft_sizes)
    corpus = train.build_stream(text[:cut], tok, rng, args.chat_fraction)
    val = train.build_stream(text[cut:], tok, random.Random(1), args.chat_fraction)
    greedy = greedy_rows(target, corpus, args.greedy_rows, 32, args.greedy_len, rng)
    before = train.greedy_acceptance(target, draft, val, args.eval_prompts)
    print(f"[distill] greedy acceptance before {before:.4f}", flush=True)
    draft = train_draft(target, draft, corpus, greedy, args, rng)
    save_draft(draft, out / "shakespeare-draft")
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    measured = train.measure_pair(target, draft, tok, val, args.eval_prompts)
    measured.pop("target_sample")
    metrics |= {
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "draft_val_loss": round(train.evaluate(draft, val[: args.val_tokens], args.seq), 4),
        **measured,
        "greedy_acceptance_before_distill": round(before, 4),
        "distill_args": {
            k: getattr(args, k)
            for k in ("distill_steps", "hard_weight", "greedy_rows", "greedy_len", "lr", "batch")
        }
        | {"seq": args.seq, "draft_sizes": draft_sizes},
    }
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
