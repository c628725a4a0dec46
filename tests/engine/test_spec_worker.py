"""The worker's speculation, driven by hand-written plans: rollback of rejected drafts
in the mirrors and both KV caches, plan-provided drafts, and bad plans."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan
from tandem.engine.spec_config import SpeculativeConfig

pytestmark = pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)

BS = 16
PROMPT = [0, 412, 23, 1187, 9, 77, 301, 15, 2048, 4, 650]
GREEDY = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


def executor(method: str | None) -> UniExecutor:
    spec = None if method is None else SpeculativeConfig(speculative_method=method)
    return UniExecutor(
        EngineConfig(dtype="float32", kv_cache_memory=8 << 20, max_model_len=256), spec
    )


class Driver:
    """Plays the scheduler for one sequence: block ids first_block, first_block + 1, ...
    in order, cut back to the computed tokens after each step (as the scheduler does)."""

    def __init__(
        self, ex: UniExecutor, seq_id: int = 0, first_block: int = 0, prompt=PROMPT
    ) -> None:
        self.ex, self.table, self.step = ex, [], 0
        self.seq_id, self.first_block, self.prompt = seq_id, first_block, list(prompt)
        self.tokens = list(prompt)
        self.num_computed = 0
        self.num_rejected = 0

    def _blocks(self, end: int) -> list[int]:
        del self.table[-(-self.num_computed // BS) :]
        new = [self.first_block + b for b in range(len(self.table), -(-end // BS))]
        self.table += new
        return new

    def plan(self, k: int, drafts: list[int] | None = None, catch_up: bool = True) -> SeqPlan:
        start = self.num_computed
        return SeqPlan(
            self.seq_id,
            self.tokens[start:],
            start,
            self._blocks(len(self.tokens) + k),
            True,
            NewSeq(GREEDY, len(self.prompt)) if start == 0 else None,
            num_draft=k,
            draft_token_ids=drafts or [],
            draft_catch_up=catch_up,
        )

    def absorb(self, plan: SeqPlan, res) -> None:
        self.step += 1
        self.num_computed += len(plan.token_ids) + res.num_accepted_drafts
        self.num_rejected += plan.num_draft - res.num_accepted_drafts
        self.tokens += res.token_ids

    def run(self, k: int, drafts: list[int] | None = None):
        plan = self.plan(k, drafts)
        res = self.ex.execute(StepPlan(self.step, [plan])).seqs[0]
        self.absorb(plan, res)
        return res


def run_together(drivers: list[Driver], ks: list[int], catch_up: list[bool]):
    """One step over several drivers' sequences (one executor); returns the results."""
    plans = [d.plan(k, catch_up=c) for d, k, c in zip(drivers, ks, catch_up, strict=True)]
    results = drivers[0].ex.execute(StepPlan(drivers[0].step, plans)).seqs
    for d, p, r in zip(drivers, plans, results, strict=True):
        d.absorb(p, r)
    for d in drivers:
        d.step = max(x.step for x in drivers)
    return results


def kv_at(cache: list[torch.Tensor], table: list[int], n: int) -> torch.Tensor:
    """(layers, 2, n, H, D): keys and values of positions 0..n-1 through the table."""
    pos = torch.arange(n)
    blocks = torch.tensor(table)[pos // BS]
    return torch.stack([c[:, blocks, :, pos % BS, :] for c in cache])


def test_rejected_drafts_roll_back_in_mirrors_and_kv_caches():
    plain = Driver(executor(None))
    plain.run(0)
    while len(plain.tokens) < len(PROMPT) + 40:
        plain.run(0)
    specs = {}
    for k in (1, 3):
        d = Driver(executor("draft"))
        d.run(0)
        while len(d.tokens) < len(PROMPT) + 40:
            d.run(k)
        assert d.num_rejected > 0  # the test needs rejections to mean anything
        n = min(len(d.tokens), len(plain.tokens))
        assert d.tokens[:n] == plain.tokens[:n]
        state = d.ex.worker.seqs[0]
        assert state.token_ids[: d.num_computed] == d.tokens[: d.num_computed]
        assert state.num_draft_computed <= len(state.token_ids)
        specs[k] = d
    # the target KV of every computed position equals the plain run's
    n = min(plain.num_computed, *(d.num_computed for d in specs.values()))
    want = kv_at(plain.ex.worker.runner.kv_caches, plain.table, n)
    for d in specs.values():
        got = kv_at(d.ex.worker.runner.kv_caches, d.table, n)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the draft KV of confirmed positions does not depend on k (rejected drafts' slots
    # were rewritten when the draft caught up)
    m = min(min(d.num_computed, d.ex.worker.seqs[0].num_draft_computed) for d in specs.values())
    one, three = (
        kv_at(specs[k].ex.worker.proposer.runner.kv_caches, specs[k].table, m) for k in (1, 3)
    )
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5)


def test_a_sequence_left_behind_catches_up_when_it_speculates():
    """draft_catch_up=False: while another sequence speculates, this one's draft KV
    stays where it was (no probe either); when it speculates later, the catch-up covers
    its whole backlog, and its drafts and draft KV are those of a run that never left
    it behind."""
    other = [5, 99, 1203, 7, 42, 6, 3000, 12]
    runs = {}
    for left_behind in (False, True):
        ex = executor("draft")
        a, b = Driver(ex, 0, 0, other), Driver(ex, 1, 8)
        run_together([a, b], [0, 0], [True, True])  # prefills: the draft rests
        for _ in range(5):  # a speculates, b decodes (left behind, or caught up)
            res = run_together([a, b], [1, 0], [True, not left_behind])
            state = ex.worker.seqs[1]
            if left_behind:
                assert res[1].probe_accepted is None and state.num_draft_computed == 0
            else:
                assert res[1].probe_accepted is not None
                assert state.num_draft_computed == b.num_computed
        for _ in range(4):  # now b speculates too
            run_together([a, b], [1, 2], [True, True])
        runs[left_behind] = b
    caught, behind = runs[False], runs[True]
    assert behind.tokens == caught.tokens and behind.num_rejected == caught.num_rejected
    n = ex.worker.seqs[1].num_draft_computed
    assert n > len(PROMPT) + 5
    kv = [
        kv_at(d.ex.worker.proposer.runner.kv_caches, d.table, min(n, d.num_computed))
        for d in (caught, behind)
    ]
    torch.testing.assert_close(kv[1], kv[0], rtol=1e-4, atol=1e-5)


def test_plan_drafts_are_verified_against_the_argmax():
    ref = Driver(executor(None))
    ref.run(0)
    for _ in range(6):
        ref.run(0)
    cont = ref.tokens[len(PROMPT) :]  # the greedy continuation, 7 tokens
    d = Driver(executor("ngram"))
    d.run(0)
    res = d.run(3, drafts=cont[1:4])  # all right: 3 kept + the bonus token
    assert res.num_accepted_drafts == 3 and res.token_ids == cont[1:5]
    wrong = (cont[6] + 1) % 4096
    res = d.run(2, drafts=[cont[5], wrong])  # the second is wrong: corrected
    assert res.num_accepted_drafts == 1 and res.token_ids == cont[5:7]


def test_bad_plans_are_refused():
    ex = executor(None)
    plan = SeqPlan(0, PROMPT, 0, [0], True, NewSeq(GREEDY, len(PROMPT)), num_draft=2)
    with pytest.raises(ValueError, match="no draft model"):
        ex.execute(StepPlan(0, [plan]))
    ex = executor("draft")
    plan = SeqPlan(
        1, PROMPT, 0, [0], True, NewSeq(GREEDY, len(PROMPT)), num_draft=1, draft_token_ids=[5]
    )
    with pytest.raises(ValueError, match="proposes its own"):
        ex.execute(StepPlan(0, [plan]))
    plan = SeqPlan(2, PROMPT, 0, [0], False, NewSeq(GREEDY, len(PROMPT)), num_draft=1)
    with pytest.raises(ValueError, match="needs sample=True"):
        ex.execute(StepPlan(1, [plan]))


def test_draft_model_needs_a_directory_for_a_non_builtin_target():
    from tandem.engine.proposers import draft_model_dir

    assert draft_model_dir(None, None) == str(BUILTIN_DRAFT)
    assert draft_model_dir("/x", "/y") == "/x"
    with pytest.raises(ValueError, match="needs speculative_model"):
        draft_model_dir(None, "/some/target")


def test_after_an_all_kept_window_the_draft_looks_back_at_the_bonus_token():
    """k = 1 windows, greedy: after a window whose draft was kept, the next step's
    catch-up forward also samples the row before the step's token (the draft's
    proposal for the bonus token, i.e. draft 2 of that window) and reports whether it
    matched; after a rejection there is nothing to look back at."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(BUILTIN_DRAFT, dtype=torch.float32)
    d = Driver(executor("draft"))
    d.run(0)
    looked, last = [], None
    for _ in range(30):
        bonus_at = d.num_computed  # the position of this step's token
        res = d.run(1)
        if last is not None and last.num_accepted_drafts == 1:
            with torch.no_grad():
                logits = hf(torch.tensor([d.tokens[:bonus_at]])).logits[0, -1]
            want = int(logits.argmax()) == d.tokens[bonus_at]
            assert res.lookback_accepted is want
            looked.append(want)
        elif last is not None:
            assert res.lookback_accepted is None
        last = res
    assert True in looked and False in looked  # both outcomes seen
