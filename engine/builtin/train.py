"""Train the built-in Shakespeare model pair (target + draft) from tinyshakespeare.txt.

A one-off, run by hand and committed; tests and CI never retrain (a test runs a few
steps). Uses transformers' LlamaForCausalLM for training only; serving uses Tandem's
own model code.

    python -m tandem.engine.builtin.train --data ../shared/data/tinyshakespeare.txt

`--distill-draft` retrains only the draft against the shipped target (distill.py).

It writes two standard Hugging Face directories beside this file (config.json,
generation_config.json, model.safetensors in bf16, tokenizer files with a chat
template) and `metrics.json` with the figures the README reports.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # Tools (OpenAI `tools`, rendered when given): a system-like turn listing them as
    # JSON and the Hermes-style call format the server's `hermes` parser reads back.
    "{% if tools %}{{ '<|system|>\\n# Tools\\n\\nYou may call one or more functions to "
    "assist with the user query.\\n\\nYou are provided with function signatures within "
    "<tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' }}'
    "{{ eos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ '<|user|>\\n<tool_response>\\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '\\n</tool_response>' }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' }}{{ call['function']['name'] | tojson }}"
    "{{ ', \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Sizes: the target deep and narrow (per-layer overhead dominates on CPU, so a 1-layer
# draft costs a small fraction of a 10-layer target), head_dim 64 for peer kernels.
TARGET = dict(
    hidden_size=256,
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
)
DRAFT = dict(
    hidden_size=256,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    add_bos(tok)
    return tok


def add_bos(tok) -> None:
    """Encoding with special tokens prepends <|bos|>, as the model was trained."""
    from tokenizers import processors

    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def split_turns(text: str) -> list[str]:
    """Speaker turns: 'NAME:\\nlines' blocks separated by blank lines."""
    return [t.strip() for t in re.split(r"\n\s*\n", text) if t.strip()]


def build_stream(text: str, hf_tok, rng: random.Random, chat_fraction: float) -> list[int]:
    """Token stream of plain passages with chat-formatted turn pairs mixed in, so the
    model learns both free continuation and answering after `<|assistant|>`."""
    turns = split_turns(text)
    ids: list[int] = []
    i = 0
    while i < len(turns) - 1:
        if rng.random() < chat_fraction:
            msgs = [
                {"role": "user", "content": turns[i]},
                {"role": "assistant", "content": turns[i + 1]},
            ]
            ids += hf_tok.encode(
                hf_tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False
            )
            i += 2
        else:
            n = rng.randint(2, 6)
            body = "\n\n".join(turns[i : i + n]) + "\n\n"
            ids += [hf_tok.bos_token_id] + hf_tok.encode(body, add_special_tokens=False)
            i += n
    return ids


def make_config(hf_tok, sizes: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(hf_tok),
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        head_dim=64,
        **sizes,
    )


def batches(stream, batch: int, seq: int, rng: random.Random):
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    while True:
        starts = [rng.randrange(0, len(data) - seq - 1) for _ in range(batch)]
        x = torch.stack([data[s : s + seq + 1] for s in starts])
        yield x[:, :-1], x[:, 1:]


def evaluate(model, stream, seq: int) -> float:
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    n = (len(data) - 1) // seq
    losses = []
    with torch.no_grad():
        for i in range(0, n, 16):
            idx = range(i, min(n, i + 16))
            x = torch.stack([data[j * seq : j * seq + seq] for j in idx])
            y = torch.stack([data[j * seq + 1 : j * seq + seq + 1] for j in idx])
            logits = model(input_ids=x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    return float(torch.stack(losses).mean())


def set_lr(opt, base_lr: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of base_lr; sets
    and returns the step's learning rate."""
    lr = base_lr * min(1.0, (step + 1) / warmup)
    lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def train_model(name, cfg, train_stream, val_stream, args, rng):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    steps = args.target_steps if name == "target" else args.draft_steps
    warmup = min(100, steps // 10 + 1)
    it = batches(train_stream, args.batch, args.seq, rng)
    t0 = time.time()
    model.train()
    for step in range(steps):
        lr = set_lr(opt, args.lr, step, steps, warmup)
        x, y = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"[{name}] step {step}/{steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    model.eval()
    val = evaluate(model, val_stream[: args.val_tokens], args.seq)
    print(f"[{name}] validation loss {val:.3f}", flush=True)
    return model, val


def greedy_acceptance(target, draft, val_stream, n_prompts=16, prompt_len=32, gen=32) -> float:
    """Fraction of positions where the draft's greedy token equals the target's, along
    the target's own greedy continuations of held-out prompts (what k-step greedy
    speculation would see, token by token)."""
    import torch

    agree = total = 0
    with torch.no_grad():
        for i in range(n_prompts):
            s = i * (len(val_stream) // n_prompts)
            prompt = torch.tensor([val_stream[s : s + prompt_len]])
            out = target.generate(prompt, max_new_tokens=gen, do_sample=False, pad_token_id=0)
            t_pred = target(out).logits[0, prompt_len - 1 : -1].argmax(-1)
            d_pred = draft(out).logits[0, prompt_len - 1 : -1].argmax(-1)
            agree += int((t_pred == d_pred).sum())
            total += t_pred.numel()
    return agree / total


def step_time(model, batch: int = 1, ctx: int = 128, reps: int = 30) -> float:
    """Mean time of one decode step with a KV cache (HF), in seconds."""
    import torch

    with torch.no_grad():
        x = torch.randint(0, 100, (batch, ctx))
        out = model(input_ids=x, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            model(input_ids=nxt, past_key_values=past, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=nxt, past_key_values=past, use_cache=True)
        return (time.perf_counter() - t0) / reps


def save(model, hf_tok, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    hf_tok.save_pretrained(out)
    GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    ).save_pretrained(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", default=str(HERE.parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt")
    )
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--target-steps", type=int, default=800)
    p.add_argument("--draft-steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-tokens", type=int, default=40_000)
    p.add_argument("--chat-fraction", type=float, default=0.3)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for acceptance")
    d = p.add_argument_group("draft distillation (distill.py): keeps target and tokenizer")
    d.add_argument("--distill-draft", action="store_true", help="retrain only the draft")
    d.add_argument("--distill-steps", type=int, default=400)
    d.add_argument("--hard-weight", type=float, default=0.1, help="weight of the label loss")
    d.add_argument("--greedy-rows", type=int, default=1024, help="target greedy continuations")
    d.add_argument("--greedy-len", type=int, default=96, help="tokens per continuation")
    return p.parse_args(argv)


def measure_pair(target, draft, hf_tok, val_stream, n_prompts: int, k: int = 4) -> dict:
    """The figures the README reports: acceptance, step times, predicted speed-up."""
    import torch

    acc = greedy_acceptance(target, draft, val_stream, n_prompts)
    t_target, t_draft = step_time(target), step_time(draft)
    ratio = t_draft / t_target
    # Expected tokens per verify step with per-position acceptance a (independent):
    # 1 + a + a^2 + ... + a^k; cost k draft steps + one target step (~ a decode).
    expected = sum(acc**j for j in range(k + 1))
    prompt = hf_tok.encode("ROMEO:\n")  # starts with <|bos|>
    sample = target.generate(
        torch.tensor([prompt]), max_new_tokens=60, do_sample=False,
        pad_token_id=hf_tok.pad_token_id,
    )  # fmt: skip
    return {
        "greedy_acceptance": round(acc, 4),
        "target_step_ms": round(t_target * 1e3, 3),
        "draft_step_ms": round(t_draft * 1e3, 3),
        "draft_target_step_ratio": round(ratio, 4),
        f"predicted_speedup_k{k}": round(expected / (1 + k * ratio), 3),
        "target_sample": hf_tok.decode(sample[0], skip_special_tokens=True),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.distill_draft:
        from tandem.engine.builtin.distill import distill

        print(json.dumps(distill(args, DRAFT), indent=2))
        return
    text = Path(args.data).read_text()
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    rng = random.Random(args.seed)
    hf_tok = wrap_tokenizer(train_tokenizer(train_text, args.vocab_size))
    train_stream = build_stream(train_text, hf_tok, rng, args.chat_fraction)
    val_stream = build_stream(val_text, hf_tok, random.Random(1), args.chat_fraction)
    print(f"vocab {len(hf_tok)}, train {len(train_stream)}, val {len(val_stream)} tokens")

    out = Path(args.out)
    models, losses = {}, {}
    for name, sizes in (("target", TARGET), ("draft", DRAFT)):
        models[name], losses[name] = train_model(
            name, make_config(hf_tok, sizes), train_stream, val_stream, args, rng
        )
        save(models[name], hf_tok, out / f"shakespeare-{name}")
    metrics = {
        "vocab_size": len(hf_tok),
        "target_params": sum(p.numel() for p in models["target"].parameters()),
        "draft_params": sum(p.numel() for p in models["draft"].parameters()),
        "target_val_loss": round(losses["target"], 4),
        "draft_val_loss": round(losses["draft"], 4),
        **measure_pair(models["target"], models["draft"], hf_tok, val_stream, args.eval_prompts),
        "args": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
