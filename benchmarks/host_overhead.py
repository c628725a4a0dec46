"""The host's share of a decode step, on this machine: two measurements.

1. `build_model_input` with and without the torch backend's gathered-KV buckets
   (GPU backends skip them: `AttentionBackend.uses_buckets`), decode at ctx 512.
2. The built-in model through the scheduler and the in-process worker, overlapped
   decode (`--overlap-decode`) off and on, alternating rounds in one process: the time
   to generate, the guesses taken, and whether the tokens are the same. On a CPU
   nothing overlaps (torch finishes each op before returning), so this shows what the
   guesses cost and that they change nothing; the gain is for GPUs (the GPU check has
   the same comparison on the device).

    python -m benchmarks.host_overhead [--rounds 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.engine.plan import SamplingParams
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

TEXTS = ["ROMEO:\nWhat light", "First Citizen:\n", "HAMLET:\nTo be, or not to be", "JULIET:\nO"]


def build_times(rounds: int) -> None:
    print("| batch | build with buckets (us) | without (us) |\n|---:|---:|---:|")
    for batch in (1, 32, 128):
        seqs = [RunSeq([5], 512, list(range(b * 40, b * 40 + 40)), 0) for b in range(batch)]
        best = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for buckets in (True, False):
                for _ in range(50):
                    build_model_input(seqs, 16, "cpu", buckets=buckets)
                t0 = time.perf_counter()
                for _ in range(400):
                    build_model_input(seqs, 16, "cpu", buckets=buckets)
                best[buckets] = min(best[buckets], (time.perf_counter() - t0) / 400 * 1e6)
        print(f"| {batch} | {best[True]:.0f} | {best[False]:.0f} |")


def overlap_times(rounds: int, num_tokens: int) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUILTIN_TARGET / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in TEXTS]
    cores = {
        on: EngineCore(
            SchedulerConfig(),
            UniExecutor(EngineConfig(kv_cache_memory=256 << 20, overlap_decode=on)),
        )
        for on in (False, True)
    }
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    print("\n| requests | overlap off (s) | overlap on (s) | guesses taken / dropped, per round "
          "| same tokens |\n|---:|---:|---:|---:|---|")  # fmt: skip
    for batch in (1, 16):
        times: dict[bool, list[float]] = {False: [], True: []}
        tokens: dict[bool, dict] = {}
        la = cores[True].executor.worker.lookahead
        hits, misses = la.num_hits, la.num_misses
        for r in range(rounds):
            for on in (False, True):
                core = cores[on]
                for i in range(batch):
                    core.add_request(GenerateRequest(f"{r}-{i}", prompts[i % len(prompts)], params))
                out: dict[int, list[int]] = {}
                t0 = time.perf_counter()
                while core.has_unfinished():
                    for o in core.step():
                        out.setdefault(int(o.request_id.split("-")[1]), []).extend(o.new_token_ids)
                times[on].append(time.perf_counter() - t0)
                tokens.setdefault(on, out)
        taken = f"{(la.num_hits - hits) / rounds:.0f} / {(la.num_misses - misses) / rounds:.0f}"
        same = "yes" if tokens[False] == tokens[True] else "NO"
        print(f"| {batch} | {min(times[False]):.3f} | {min(times[True]):.3f} | {taken} | {same} |")
    for core in cores.values():
        core.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    args = p.parse_args()
    build_times(args.rounds)
    overlap_times(args.rounds, args.tokens)


if __name__ == "__main__":
    main()
