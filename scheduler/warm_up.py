"""Start-up warm-up: a few synthetic requests before the first real one.

A fresh process pays first-time costs on its first steps (allocator growth, kernel
selection, lazily built buffers): measured on the built-in pair, the first prefill
took 13 ms against 6 ms later and the first verification window 10 ms against 4.5 ms.
A user's first request should not pay them, and neither should the goodput
controller: its step-cost model, fitted from those first steps, read them as a steep
per-token cost and kept k at 1 for the whole first request (and, decaying slowly,
low for the next ones).

So before serving, the core runs two passes of the same schedule over synthetic
prompts (a random 8-token pattern repeated, so the n-gram proposer finds drafts too):
for batch sizes 1 and 4, a prefill, then K + 1 decode steps with every sequence at
k = 0, 1, .., K, twice. The first pass warms up and is forgotten; the second is
measured, and its steps are the cost model's first observations, covering every
depth and two batch sizes, so the fit starts out well posed. Nothing else is learned
from these steps (the planner's `forced_k` turns off acceptance statistics and
counters), and afterwards the block pool, the step statistics and the speculation
counters are reset: metrics start at zero and block ids are handed out as in a new
pool.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from tandem.engine.plan import SamplingParams
from tandem.scheduler.cost_model import StepCostModel
from tandem.scheduler.request import GenerateRequest

if TYPE_CHECKING:
    from tandem.scheduler.core import EngineCore

WARM_UP_ID = "tandem-warm-up"
PATTERN = 8  # distinct tokens of the synthetic prompt's repeated pattern
PROMPT = 32  # prompt tokens of each synthetic request
BATCHES = (1, 4)  # sequences per pass
CYCLES = 2  # times each pass cycles k through 0..K


def warm_up(core: EngineCore, seed: int = 0) -> float:
    """Run the warm-up on a core that has no requests yet; returns its seconds. Skips
    (returns 0) where the model's length or the KV pool leaves no room for it."""
    sched = core.scheduler
    if sched.has_unfinished():
        raise RuntimeError("the warm-up runs before any request is added")
    planner = sched.spec
    max_k = planner.max_k if planner is not None else 0
    max_tokens = 1 + CYCLES * (max_k + 1) * (max_k + 2) // 2  # the most a pass can yield
    prompt_len = min(PROMPT, sched.max_len - max_tokens - max_k - 1)
    blocks_each = sched.pool.blocks_for(prompt_len + max_tokens + max_k + 1)
    batches = [
        b
        for b in BATCHES
        if b <= sched.config.max_num_seqs and b * blocks_each <= sched.pool.num_blocks // 2
    ]
    vocab = core.kv.vocab_size
    if prompt_len < PATTERN or vocab < 2 or not batches:
        return 0.0
    t0 = time.perf_counter()
    rng = random.Random(seed)
    try:
        for measure in (False, True):
            if planner is not None and measure:
                planner.costs = StepCostModel()  # forget the first pass's slow steps
            for b in batches:
                prompts = []
                for _ in range(b):
                    pattern = [rng.randrange(1, vocab) for _ in range(PATTERN)]
                    prompts.append((pattern * (prompt_len // PATTERN + 1))[:prompt_len])
                _run_pass(core, f"{WARM_UP_ID}-{int(measure)}-{b}", prompts, max_k, max_tokens)
    finally:
        if planner is not None:
            planner.forced_k = None
            planner.reset_stats()
    sched.pool.reset()
    core.reset_step_stats()
    return time.perf_counter() - t0


def _run_pass(
    core: EngineCore, name: str, prompts: list[list[int]], max_k: int, max_tokens: int
) -> None:
    """Prefill the prompts, then step with k = 0..max_k for every sequence, CYCLES times;
    abort what is left."""
    planner = core.scheduler.spec
    ids = [f"{name}-{i}" for i in range(len(prompts))]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for rid, prompt in zip(ids, prompts, strict=True):
        core.add_request(
            GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
        )
    if planner is not None:
        planner.forced_k = 0
    started: set[str] = set()
    for _ in range(sum(map(len, prompts))):  # one step for all, unless the budget is small
        started.update(o.request_id for o in core.step() if o.new_token_ids)
        if len(started) == len(prompts):
            break
    for k in list(range(max_k + 1)) * CYCLES:
        if not core.has_unfinished():
            break
        if planner is not None:
            planner.forced_k = k
        core.step()
    for rid in ids:
        core.abort_request(rid)
