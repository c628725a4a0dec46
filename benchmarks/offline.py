"""Offline generation throughput of Tandem's engine (no HTTP), with the time of each
phase of a step and the memory-bandwidth floor.

    python -m benchmarks.offline                      # built-in model + random 55M Llama
    python -m benchmarks.offline --models random55m --batches 1 8 64 --hf

For each model and batch size B it submits B requests at once (prompt 128 tokens,
128 output tokens, ignore_eos) and steps the engine until all finish. Columns:

    tok/s        output tokens per second over the whole run
    step ms      mean wall time of one decode step (all B sequences advance)
    sched/prep/fwd/sample/update   mean ms of each phase of a step
    floor ms     bytes read per decode step (weights + KV) / measured copy bandwidth
    HF tok/s     transformers generate (greedy, static batch of B), with --hf

Prints a Markdown table; paste it into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest


@dataclass
class Row:
    model: str
    batch: int
    tok_s: float
    step_ms: float
    phases_ms: dict
    floor_ms: float
    hf_tok_s: float | None = None


def make_random_llama(out: Path, dtype=torch.bfloat16, **sizes: int) -> Path:
    """A random Llama saved as a Hugging Face directory (seed 0, untied embeddings,
    vocab 32000). Default sizes: ~55M parameters (hidden 512, 8 layers, 8 heads, 2 KV
    heads); `sizes` overrides LlamaConfig fields (e.g. hidden_size=768)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        **sizes,
    }
    cfg = LlamaConfig(**fields, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


def copy_bandwidth() -> float:
    """Measured memory copy bandwidth in bytes/s (read + write of a 256 MiB buffer)."""
    src = torch.empty(64 << 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    dt = (time.perf_counter() - t0) / reps
    return 2 * src.numel() * 4 / dt


def bytes_per_decode_step(executor: UniExecutor, batch: int, ctx: int) -> int:
    runner = executor.worker.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    cfg = runner.hf_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    kv = batch * ctx * per_token * runner.dtype.itemsize
    return weights + kv


def run_tandem(model_dir, batch, prompt_len, output_len, dtype, bw) -> Row:
    engine_cfg = EngineConfig(model=str(model_dir), dtype=dtype, kv_cache_memory=2 << 30)
    executor = UniExecutor(engine_cfg)
    core = EngineCore(
        SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=4096), executor
    )
    vocab = executor.worker.runner.vocab_size
    g = torch.Generator().manual_seed(batch)
    # Warm up (allocator, first-call overheads) with a short request.
    _generate(core, [[5] * 16], 4)
    prompts = [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    phases = {k: 0.0 for k in ("schedule", "prepare", "forward", "sample", "update")}
    decode_steps = decode_time = 0.0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(_request(f"r{i}", p, output_len))
    while core.has_unfinished():
        ts = time.perf_counter()
        plan = core.scheduler.schedule()
        te = time.perf_counter()
        result = executor.execute(plan)
        tu = time.perf_counter()
        core.scheduler.update(plan, result)
        tend = time.perf_counter()
        if all(len(s.token_ids) == 1 for s in plan.seqs):  # a pure decode step
            decode_steps += 1
            decode_time += tend - ts
            phases["schedule"] += te - ts
            phases["update"] += tend - tu
            for k in ("prepare", "forward", "sample"):
                phases[k] += result.phase_times_s.get(k, 0.0)
    total = time.perf_counter() - t0
    n = max(decode_steps, 1)
    floor = bytes_per_decode_step(executor, batch, prompt_len + output_len // 2) / bw
    executor.shutdown()
    return Row(
        model=str(model_dir),
        batch=batch,
        tok_s=batch * output_len / total,
        step_ms=1e3 * decode_time / n,
        phases_ms={k: 1e3 * v / n for k, v in phases.items()},
        floor_ms=1e3 * floor,
    )


def _request(rid, prompt, output_len) -> GenerateRequest:
    sp = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    return GenerateRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sp, arrival_time=time.time()
    )


def _generate(core, prompts, output_len) -> None:
    for i, p in enumerate(prompts):
        core.add_request(_request(f"warm{i}", p, output_len))
    while core.has_unfinished():
        core.step()


def run_hf(model_dir, batch, prompt_len, output_len, dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    vocab = model.config.vocab_size
    x = torch.randint(10, vocab, (batch, prompt_len))
    kw = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        model.generate(x, **kw)
    return batch * output_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["builtin", "random55m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf", action="store_true", help="also time transformers generate")
    ap.add_argument("--hf-max-batch", type=int, default=8)
    args = ap.parse_args()

    bw = copy_bandwidth()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"copy bandwidth {bw / 1e9:.1f} GB/s, dtype {args.dtype}"
    )
    tmp = tempfile.TemporaryDirectory()
    dirs = {"builtin": BUILTIN_TARGET, "random55m": None}
    rows = []
    for name in args.models:
        model_dir = dirs.get(name) or Path(name)
        if name == "random55m":
            model_dir = make_random_llama(Path(tmp.name) / "random55m")
        for b in args.batches:
            row = run_tandem(model_dir, b, args.prompt_len, args.output_len, args.dtype, bw)
            row.model = name
            if args.hf and b <= args.hf_max_batch:
                row.hf_tok_s = run_hf(model_dir, b, args.prompt_len, args.output_len, args.dtype)
            rows.append(row)
            print_row(row, header=len(rows) == 1)


def print_row(r: Row, header: bool) -> None:
    if header:
        print(
            "| model | B | tok/s | step ms | sched | prep | fwd | sample | update | "
            "floor ms | HF tok/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    p = r.phases_ms
    hf = f"{r.hf_tok_s:.0f}" if r.hf_tok_s else "-"
    print(
        f"| {r.model} | {r.batch} | {r.tok_s:.0f} | {r.step_ms:.2f} | {p['schedule']:.2f} | "
        f"{p['prepare']:.2f} | {p['forward']:.2f} | {p['sample']:.2f} | {p['update']:.2f} | "
        f"{r.floor_ms:.2f} | {hf} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
