"""Trace the goodput controller at c = 1: each step's k, the request's acceptance
rates per draft position, the draft's catch-up tokens and the marginal costs
(base step, catch-up, per draft forward, per draft token; ms) the choice used.

    .venv/bin/python -m benchmarks.spec_trace

Offline (EngineCore stepped directly, wall-clock step timer as in serving), the
built-in pair, warmed up as in serving, 4 short prompts x 4 rounds of 64 greedy tokens,
one request at a time.
Prints the histogram of chosen k and every 7th of the last 200 steps. A diagnostic
for the speculation issue: it wraps SpecPlanner._choose, a private method.
"""

import collections
import time

import torch
from transformers import PreTrainedTokenizerFast

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import SamplingParams
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler import speculation as S
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest
from tandem.server.build import freeze_heap

torch.set_num_threads(1)
tok = PreTrainedTokenizerFast.from_pretrained(BUILTIN_TARGET)
prompts = ["ROMEO:\n", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:\n"]
log = []
orig = S.SpecPlanner._choose


def traced(self, cands, plans, catch_up, budget, horizon):
    ks = orig(self, cands, plans, catch_up, budget, horizon)
    if cands and self.costs.ready:
        base = self._features(plans, None)
        m = self.costs.marginal(base, catch_up)
        log.append(
            (
                ks[0],
                [round(r, 2) for r in cands[0].rates],
                catch_up,
                round(m.base_time * 1e3, 2),
                round(m.draft_catch_up * 1e3, 2),
                round(m.per_draft_forward * 1e3, 2),
                round(m.per_draft_token * 1e3, 3),
            )
        )
    return ks


S.SpecPlanner._choose = traced
spec = SpeculativeConfig(
    speculative_method="draft", speculation_policy="goodput", num_speculative_tokens=4
)
core = EngineCore(
    SchedulerConfig(),
    UniExecutor(EngineConfig(num_threads=1), spec),
    spec=spec,
    step_timer=time.perf_counter,
)
core.warm_up()  # as the server does (its forced steps are left out of the histogram),
freeze_heap()  # both
log.clear()
for r in range(4):
    for i, p in enumerate(prompts):
        core.add_request(
            GenerateRequest(
                request_id=f"{r}-{i}",
                prompt_token_ids=tok.encode(p),
                sampling=SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                arrival_time=time.time(),
            )
        )
        while core.has_unfinished():
            core.step()
print("chosen k:", dict(sorted(collections.Counter(k for k, *_ in log).items())))
print("(k, rates, catch_up, base_ms, catch_up_ms, per_draft_forward_ms, per_draft_token_ms)")
for row in log[-200::7]:
    print(row)
