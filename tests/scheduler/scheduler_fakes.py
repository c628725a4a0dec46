"""A fake executor that checks every plan the way a worker would use it.

It keeps a mirror of each sequence built only from the plans (new / token_ids /
start_pos / new_block_ids / finished / preempted), writes each computed token into a
fake paged KV cache, and picks the next token as a deterministic function of the
context it READS BACK from the KV cache through the block table. So a wrong block, a
stale prefix-cache hit, a gap in positions or a block shared while being written
either trips an assertion or changes the tokens.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from tandem.engine.plan import (
    KVCacheInfo,
    SamplingParams,
    SeqPlan,
    SeqResult,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest, RequestOutput

VOCAB = 50


def hash_next_token(ctx: list[int]) -> int:
    """The fake model: a rolling hash of the whole context. Never 0 (0 is eos in tests
    that want eos; use `next_token=` to script it)."""
    h = 17
    for t in ctx:
        h = (h * 31 + t + 7) % 1_000_003
    return 1 + h % (VOCAB - 1)


def reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What an unbatched, unchunked run of hash_next_token produces (no eos)."""
    ctx = list(prompt)
    for _ in range(max_tokens):
        ctx.append(hash_next_token(ctx))
    return ctx[len(prompt) :]


@dataclass
class Mirror:
    tokens: list[int]  # every token the plans said to compute, in position order
    table: list[int]  # block ids
    num_prompt: int
    sampling: SamplingParams


class FakeExecutor:
    """Implements the Executor protocol; see the module docstring."""

    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 512,
        eos_token_ids: tuple[int, ...] = (0,),
        next_token: Callable[[list[int]], int] = hash_next_token,
        fail_at_step: int | None = None,
        step_delay_s: float = 0.0,
        lookahead_slots: int = 0,
    ) -> None:
        self.info = KVCacheInfo(
            num_blocks, block_size, max_model_len, eos_token_ids, VOCAB, lookahead_slots
        )
        self.next_token = next_token
        self.fail_at_step = fail_at_step
        self.step_delay_s = step_delay_s
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, Mirror] = {}
        self.plans: list[StepPlan] = []
        self.freed_seq_ids: list[int] = []
        self.shut_down = False
        self.num_ahead = 0  # sampling runs given the block of the position after them

    def kv_cache_info(self) -> KVCacheInfo:
        return self.info

    def shutdown(self) -> None:
        self.shut_down = True

    def execute(self, plan: StepPlan) -> StepResult:
        if self.fail_at_step is not None and len(self.plans) >= self.fail_at_step:
            raise RuntimeError("injected executor failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        assert plan.seqs, "an empty plan was sent"
        assert not self.plans or plan.step_id > self.plans[-1].step_id
        self.plans.append(plan)
        for seq_id in plan.finished_seq_ids + plan.preempted_seq_ids:
            assert seq_id in self.seqs, f"freeing unknown seq {seq_id}"
            del self.seqs[seq_id]
            self.freed_seq_ids.append(seq_id)
        assert len({s.seq_id for s in plan.seqs}) == len(plan.seqs), "a seq twice in a step"
        mirrors = [self._apply(sp) for sp in plan.seqs]
        owners: dict[int, set[int]] = defaultdict(set)
        for seq_id, m in self.seqs.items():
            for b in m.table:
                owners[b].add(seq_id)
        results = [self._run(sp, m, owners) for sp, m in zip(plan.seqs, mirrors, strict=True)]
        return StepResult(plan.step_id, [r for r in results if r is not None], target_time_s=0.001)

    def _apply(self, sp: SeqPlan) -> Mirror:
        bs = self.info.block_size
        if sp.new is not None:
            assert sp.seq_id not in self.seqs, f"seq {sp.seq_id} sent as new twice"
            prefix = list(sp.new.prefix_token_ids)
            assert len(prefix) == sp.start_pos, "prefix tokens must fill [0, start_pos)"
            m = Mirror(prefix, [], sp.new.num_prompt_tokens, sp.new.sampling)
            self.seqs[sp.seq_id] = m
        else:
            assert sp.seq_id in self.seqs, f"seq {sp.seq_id} continued but never sent as new"
            m = self.seqs[sp.seq_id]
        assert sp.start_pos == len(m.tokens), (
            f"seq {sp.seq_id}: plan starts at {sp.start_pos}, mirror holds {len(m.tokens)}"
        )
        assert sp.token_ids, "a seq planned with no tokens"
        slots = self.info.lookahead_slots
        # a worker cuts its table to blocks_for(start_pos + slots): nothing to cut here
        assert len(m.table) <= -(-(sp.start_pos + slots) // bs), f"seq {sp.seq_id}: stale blocks"
        assert not set(sp.new_block_ids) & set(m.table), "a block appended twice"
        assert all(0 <= b < self.info.num_blocks for b in sp.new_block_ids)
        m.table.extend(sp.new_block_ids)
        end = sp.start_pos + len(sp.token_ids) + sp.num_draft
        ahead = slots if sp.sample else 0  # a sampling run may hold the next blocks too
        assert -(-end // bs) <= len(m.table) <= -(-(end + ahead) // bs), (
            f"seq {sp.seq_id}: {len(m.table)} blocks for {end} positions"
        )
        self.num_ahead += len(m.table) > -(-end // bs)
        if sp.new is not None:  # a prefix-cache hit must hold exactly the prefix
            assert [self._read(m, p) for p in range(sp.start_pos)] == m.tokens
        return m

    def _read(self, m: Mirror, pos: int) -> int | None:
        bs = self.info.block_size
        return self.kv[m.table[pos // bs]][pos % bs]

    def _run(self, sp: SeqPlan, m: Mirror, owners: dict[int, set[int]]) -> SeqResult | None:
        bs = self.info.block_size
        for i, tok in enumerate(sp.token_ids):
            pos = sp.start_pos + i
            block = m.table[pos // bs]
            assert owners[block] == {sp.seq_id}, f"block {block} written while shared"
            self.kv[block][pos % bs] = tok
        m.tokens.extend(sp.token_ids)
        result = SeqResult(sp.seq_id, [])
        if m.sampling.prompt_logprobs is not None and sp.start_pos < m.num_prompt:
            stop = min(len(m.tokens), m.num_prompt)
            result.prompt_logprobs = [
                None if p == 0 else TokenLogprobs(m.tokens[p], -float(p), [], 1)
                for p in range(sp.start_pos, stop)
            ]
        if sp.sample:
            ctx = [self._read(m, p) for p in range(len(m.tokens))]
            assert ctx == m.tokens, f"seq {sp.seq_id}: KV cache does not hold its tokens"
            tok = self.next_token(m.tokens)
            result.token_ids = [tok]
            if m.sampling.logprobs is not None:
                top = [((tok + j) % VOCAB, -0.5 - j) for j in range(m.sampling.logprobs)]
                result.logprobs = [TokenLogprobs(tok, -0.5, top, 1)]
        if sp.sample or result.prompt_logprobs is not None:
            return result
        return None


def make_core(
    executor: FakeExecutor | None = None, **config: object
) -> tuple[EngineCore, FakeExecutor]:
    ex = executor or FakeExecutor()
    return EngineCore(SchedulerConfig(**config), ex), ex  # type: ignore[arg-type]


def greedy(max_tokens: int = 8, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def run_to_end(
    core: EngineCore, reqs: list[GenerateRequest], max_steps: int = 5000
) -> dict[str, list[RequestOutput]]:
    """Submit reqs, step until all finish; every output, per request, in order."""
    for r in reqs:
        core.add_request(r)
    outs: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not core.has_unfinished():
            return outs
        for o in core.step():
            assert not outs[o.request_id] or not outs[o.request_id][-1].finished
            outs[o.request_id].append(o)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]
