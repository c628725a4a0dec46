"""GPU check, decode through the worker: overlapped steps (`--overlap-decode`) off and on.

One Worker on the check's random model, driven by plans as the scheduler writes them
(each sequence's blocks handed out as its positions reach them, with the worker's
lookahead slot). Per batch size, rounds
of decode steps alternate overlap off / on over fresh sequences with the same prompts,
so drift hits both alike. Each row: the mean step (plan to results, the step's host
sync included), tokens/s, the fraction of copy bandwidth, how many guesses were taken
and dropped (one drop per round: the next round's first plan is not the last guess),
how many synchronising calls torch's sync debug mode reported while overlapped (0
expected: a sync in the guess path serialises it; one per step would be the step's
own wait, if the mode counts event waits), and whether the tokens equal those of the
plain path.

Part of `python -m benchmarks.gpu_check`; needs only engine/ and kernels/.
"""

from __future__ import annotations

import time
import warnings

import torch

from benchmarks.gpu_check_model import Blocks, kv_bytes_per_token, weight_bytes_per_step
from benchmarks.gpu_check_report import Section, sync
from tandem.engine.config import EngineConfig
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan
from tandem.engine.worker import Worker


def make_worker(model_dir, device, dtype: str, backend: str, kv_bytes: int) -> Worker:
    config = EngineConfig(
        model=str(model_dir), dtype=dtype, device=str(device), block_size=16,
        kv_cache_memory=kv_bytes, max_model_len=4096, attention_backend=backend,
        overlap_decode=True,
    )  # fmt: skip
    return Worker(config)


class _Batch:
    """`batch` sequences with seeded random prompts of ctx tokens, and their plans."""

    def __init__(self, worker: Worker, first_id: int, batch: int, ctx: int, num_tokens: int,
                 params: SamplingParams) -> None:  # fmt: skip
        self.bs = worker.runner.block_size
        blocks = Blocks(self.bs, worker.runner.num_blocks)
        g = torch.Generator().manual_seed(5)
        self.ids = list(range(first_id, first_id + batch))
        self.tables = [blocks.take(num_tokens) for _ in self.ids]
        self.tokens = [torch.randint(3, 500, (ctx,), generator=g).tolist() for _ in self.ids]
        self.computed = [0] * batch
        self.sent = [0] * batch  # blocks handed to the worker so far
        self.slots = worker.kv_cache_info().lookahead_slots
        self.params = params

    def plan(self, step_id: int, which: list[int], finished: list[int] | None = None) -> StepPlan:
        seqs = []
        for i in which:
            start, end = self.computed[i], len(self.tokens[i])
            # as the scheduler does: the run's blocks, and with the worker's lookahead
            # slot the block of the position after it
            want = -(-(end + self.slots) // self.bs)
            new = self.tables[i][self.sent[i] : want]
            self.sent[i] = max(self.sent[i], want)
            first = NewSeq(self.params, end) if start == 0 else None
            seqs.append(SeqPlan(self.ids[i], self.tokens[i][start:], start, new, True, first))
        return StepPlan(step_id, seqs, finished_seq_ids=finished or [])

    def absorb(self, plan: StepPlan, result) -> None:
        for p, r in zip(plan.seqs, result.seqs, strict=True):
            i = self.ids.index(p.seq_id)
            self.computed[i] = p.start_pos + len(p.token_ids)
            self.tokens[i] += r.token_ids


def _round(worker: Worker, batch: int, ctx: int, steps: int, params, overlap: bool,
           first_id: int, finished: list[int]):  # fmt: skip
    """Prefill (freeing `finished` first), then `steps` timed decode steps; returns
    (step seconds, output tokens, syncs reported, this round's sequence ids)."""
    worker.lookahead.enabled = overlap
    b = _Batch(worker, first_id, batch, ctx, ctx + steps + 8, params)
    step_id = 0
    for i in range(0, batch, 16):  # prefill 16 prompts a step
        plan = b.plan(step_id, list(range(i, min(i + 16, batch))), finished if i == 0 else None)
        plan.admits_next = i + 16 < batch  # as the scheduler says while prompts wait
        b.absorb(plan, worker.execute(plan))
        step_id += 1
    for _ in range(3):  # warm-up: graph capture, the first guesses
        plan = b.plan(step_id, list(range(batch)))
        b.absorb(plan, worker.execute(plan))
        step_id += 1
    sync(worker.runner.device)
    cuda = worker.runner.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda and overlap:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            t0 = time.perf_counter()
            for _ in range(steps):
                plan = b.plan(step_id, list(range(batch)))
                b.absorb(plan, worker.execute(plan))
                step_id += 1
            elapsed = time.perf_counter() - t0
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return elapsed / steps, [t[ctx:] for t in b.tokens], syncs, b.ids


def worker_seq_ids(worker: Worker) -> list[int]:
    """The sequences the worker still holds (the last round's, freed by the next)."""
    return list(worker.seqs)


def worker_decode(section: Section, worker: Worker, batch: int, ctx: int, steps: int,
                  copy_bw: float, sampled: bool = False, rounds: int = 2) -> None:  # fmt: skip
    """Rows for overlap off and on at one batch size (alternating rounds, means)."""
    if sampled:
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=1 << 20)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    la = worker.lookahead
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list] = {}
    syncs = 0
    hits, misses = la.num_hits, la.num_misses
    next_id, finished = 1_000_000 * (batch + 1), worker_seq_ids(worker)
    for _ in range(rounds):
        for overlap in (False, True):
            step_s, tokens, n, finished = _round(
                worker, batch, ctx, steps, params, overlap, next_id, finished
            )
            next_id += batch
            times[overlap].append(step_s)
            outputs.setdefault(overlap, tokens)
            syncs += n if overlap else 0
    same = "yes" if outputs[False] == outputs[True] else "NO"
    step_bytes = weight_bytes_per_step(worker.runner) + batch * (ctx + steps // 2) * (
        kv_bytes_per_token(worker.runner)
    )
    kind = "sampled" if sampled else "greedy"
    for overlap in (False, True):
        step_s = sum(times[overlap]) / len(times[overlap])
        taken = f"{la.num_hits - hits} / {la.num_misses - misses}" if overlap else "-"
        section.add(batch, f"{kind}, overlap {'on' if overlap else 'off'}", step_s * 1e3,
                    batch / step_s, step_bytes / step_s / copy_bw, taken,
                    syncs if overlap else "-", same)  # fmt: skip
