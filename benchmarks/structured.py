"""Cost of structured output (constrained decoding) with the built-in model.

    python -m benchmarks.structured                  # batch 1 and 32
    python -m benchmarks.structured --batches 1 8 32 --runs 3

1. Per-step overhead at batch B (no model): for B sequences walking through a valid
   JSON output token by token, the mean time per step of
      mask     GrammarState.sync + bitmask for every row (llguidance, host)
      build    the extra SamplingMetadata.build time for the B bitmasks (pack, unpack)
      apply    the extra process_logits time of masking the (B, V) logits
   each against the same step without constraints (medians over repeats).
2. End to end, the engine stepped directly (greedy, float32): output tokens/s for B
   requests constrained by a JSON schema (max_tokens 48; they stop at ~40) vs B free
   requests of as many tokens (ignore_eos), best of --runs, alternating.

Prints Markdown tables; paste them into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams, StructuredOutput
from tandem.engine.sampler import SampleRow, SamplingMetadata, process_logits
from tandem.engine.structured import GrammarCompiler, load_ll_tokenizer
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

VOCAB, EOS = 4096, (1,)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "angry"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
SAMPLE = '{"name":"Romeo","age":16,"mood":"sad","tags":["love","night","woe"]}'
SO = StructuredOutput("json_schema", json.dumps(SCHEMA))


def per_step_overhead(batch: int, repeats: int) -> dict[str, float]:
    """Mean microseconds per step of mask, build and apply for `batch` rows."""
    compiler = GrammarCompiler(load_ll_tokenizer(BUILTIN_TARGET, VOCAB, EOS), VOCAB)
    tokens = compiler.tokenizer.tokenize_str(SAMPLE)
    params = SamplingParams(temperature=0.8, seed=1)
    logits = torch.randn(batch, VOCAB)
    times: dict[str, list[float]] = {
        k: [] for k in ("mask", "build_free", "build", "sample_free", "sample")
    }
    for _ in range(repeats):
        states = [compiler.new_state(SO) for _ in range(batch)]
        for t in range(len(tokens)):
            t0 = time.perf_counter()
            masks = []
            for s in states:
                s.sync(tokens[:t])
                masks.append(s.bitmask())
            t1 = time.perf_counter()
            free = [SampleRow(params, 1, t, [], []) for _ in range(batch)]
            rows = [SampleRow(params, 1, t, [], [], allowed=m) for m in masks]
            t2 = time.perf_counter()
            free_meta = SamplingMetadata.build(free, EOS, VOCAB, "cpu")
            t3 = time.perf_counter()
            meta = SamplingMetadata.build(rows, EOS, VOCAB, "cpu")
            t4 = time.perf_counter()
            process_logits(logits, free_meta)
            t5 = time.perf_counter()
            process_logits(logits, meta)
            t6 = time.perf_counter()
            times["mask"].append(t1 - t0)
            times["build_free"].append(t3 - t2)
            times["build"].append(t4 - t3)
            times["sample_free"].append(t5 - t4)
            times["sample"].append(t6 - t5)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    # differences of medians: single differences are noise-sized on a busy machine
    return {
        "mask": med["mask"],
        "build": med["build"] - med["build_free"],
        "apply": med["sample"] - med["sample_free"],
    }


def end_to_end(
    batch: int, constrained: bool, runs: int, max_tokens: int = 48
) -> tuple[float, float]:
    """(best output tokens/s, mean output tokens per request) over `runs` runs."""
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json")).encode(
        "ROMEO:\nWho are you?\n"
    )
    best, per_req = 0.0, 0.0
    for _ in range(runs):
        engine = EngineConfig(dtype="float32", kv_cache_memory=256 << 20, max_model_len=256)
        core = EngineCore(SchedulerConfig(), UniExecutor(engine))
        for i in range(batch):
            sp = SamplingParams(
                temperature=0.0,
                max_tokens=max_tokens,
                ignore_eos=not constrained,
                structured=SO if constrained else None,
            )
            core.add_request(GenerateRequest(f"r{i}", prompt.ids + [i % 7 + 100], sp))
        n = 0
        t0 = time.perf_counter()
        while core.has_unfinished():
            n += sum(len(o.new_token_ids) for o in core.step())
        dt = time.perf_counter() - t0
        core.shutdown()
        best, per_req = max(best, n / dt), n / batch
    return best, per_req


def one_time_costs() -> str:
    """Per engine: the llguidance tokenizer; per schema: its first compile."""
    t0 = time.perf_counter()
    compiler = GrammarCompiler(load_ll_tokenizer(BUILTIN_TARGET, VOCAB, EOS), VOCAB)
    t1 = time.perf_counter()
    compiler.compile(SO)
    t2 = time.perf_counter()
    compiler.new_state(SO)
    t3 = time.perf_counter()
    return (
        f"one-time: tokenizer {1e3 * (t1 - t0):.0f} ms per engine, schema compile "
        f"{1e3 * (t2 - t1):.0f} ms (first use), new state from cache {1e6 * (t3 - t2):.0f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(one_time_costs() + "\n")
    print("| B | mask µs/step | build µs/step | apply µs/step | total µs/step | per row µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in args.batches:
        o = per_step_overhead(b, args.repeats)
        total = sum(o.values())
        print(
            f"| {b} | {o['mask']:.0f} | {o['build']:.0f} | {o['apply']:.0f} | {total:.0f} "
            f"| {total / b:.0f} |"
        )
    print("\n| B | free tok/s | constrained tok/s | ratio | constrained tokens/request |")
    print("|---|---:|---:|---:|---:|")
    end_to_end(1, True, 1)  # warm-up: first model load, first grammar compile
    for b in args.batches:
        free = con = per_req = 0.0
        for _ in range(args.runs):  # alternate, so a load change hits both alike
            c, per_req = end_to_end(b, True, 1)
            con = max(con, c)  # free runs as many tokens as the constrained ones got
            free = max(free, end_to_end(b, False, 1, max_tokens=round(per_req))[0])
        print(f"| {b} | {free:.0f} | {con:.0f} | {con / free:.2f} | {per_req:.1f} |")


if __name__ == "__main__":
    main()
