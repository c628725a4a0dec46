"""A fake executor that speculates, checking every plan the way a worker uses it.

Like `scheduler_fakes.FakeExecutor` (a fake paged KV cache that tokens are written to
and read back from through the block table; the next token is a hash of the context
read back), plus speculation: each plan's start_pos cuts the mirror's tokens and its
block table (to ceil(start_pos / block_size) blocks) before new blocks are appended,
and the table must then hold exactly the blocks of the window. Drafts are the plan's
(n-gram), or proposed here by a fake draft model that is right where
`draft_is_right(ctx)` says; verification keeps the drafts matching the target's tokens.
Optionally each step costs synthetic time on the fake's own clock (`timer`, given to
`EngineCore(step_timer=...)`), so a closed loop measures exactly those costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler_fakes import VOCAB, hash_next_token

from tandem.engine.plan import KVCacheInfo, SamplingParams, SeqPlan, SeqResult, StepPlan, StepResult


def cyclic_next_token(ctx: list[int]) -> int:
    """A fake model whose next token depends on the last token only, so its outputs
    fall into short cycles that n-gram lookup predicts (never 0, the eos id)."""
    return 1 + (ctx[-1] * 5 + 3) % 13


def reference(prompt: list[int], max_tokens: int, next_token=hash_next_token) -> list[int]:
    """What an unbatched, unspeculated run of next_token produces (no eos)."""
    ctx = list(prompt)
    for _ in range(max_tokens):
        ctx.append(next_token(ctx))
    return ctx[len(prompt) :]


def draft_right_70(ctx: list[int]) -> bool:
    """The fake draft agrees with the target for ~70% of contexts."""
    return (sum(ctx) * 2654435761 >> 7) % 10 < 7


@dataclass
class SpecMirror:
    tokens: list[int]  # tokens written so far (window drafts included until cut)
    table: list[int]  # block ids
    num_prompt: int
    sampling: SamplingParams


class SpecFakeExecutor:
    """Implements the Executor protocol with drafts and verification; see above."""

    def __init__(
        self,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 512,
        draft_model: bool = False,
        draft_is_right: Callable[[list[int]], bool] = draft_right_70,
        step_cost_s: Callable[[StepPlan], tuple[float, float]] | None = None,
        next_token: Callable[[list[int]], int] = hash_next_token,
    ) -> None:
        """draft_model: propose drafts here (else the plans must carry them);
        step_cost_s: (target, draft) seconds a plan advances `timer` by; next_token: the
        fake target model (a function of the context read back from the KV cache)."""
        self.info = KVCacheInfo(num_blocks, block_size, max_model_len, (0,), VOCAB)
        self.next_token = next_token
        self.draft_model = draft_model
        self.draft_is_right = draft_is_right
        self.step_cost_s = step_cost_s
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, SpecMirror] = {}
        self.plans: list[StepPlan] = []
        self._draft_runs = False  # whether the fake draft model runs this step
        self.now_s = 0.0  # the synthetic clock: sum of the steps' costs so far

    def timer(self) -> float:
        """The synthetic clock, in seconds (only steps advance it)."""
        return self.now_s

    def kv_cache_info(self) -> KVCacheInfo:
        return self.info

    def shutdown(self) -> None:
        self.seqs.clear()

    def execute(self, plan: StepPlan) -> StepResult:
        assert plan.seqs, "an empty plan was sent"
        self.plans.append(plan)
        for seq_id in plan.finished_seq_ids + plan.preempted_seq_ids:
            del self.seqs[seq_id]
        results = []
        self._draft_runs = any(sp.num_draft for sp in plan.seqs)  # the worker's rule
        for sp in plan.seqs:
            m = self._apply(sp)
            res = self._run(sp, m)
            if res is not None:
                results.append(res)
        target_s, draft_s = self.step_cost_s(plan) if self.step_cost_s else (0.001, 0.0)
        self.now_s += target_s + draft_s
        return StepResult(plan.step_id, results, draft_time_s=draft_s, target_time_s=target_s)

    def _apply(self, sp: SeqPlan) -> SpecMirror:
        bs = self.info.block_size
        if sp.new is not None:
            assert sp.seq_id not in self.seqs, f"seq {sp.seq_id} sent as new twice"
            m = SpecMirror(
                list(sp.new.prefix_token_ids), [], sp.new.num_prompt_tokens, sp.new.sampling
            )
            self.seqs[sp.seq_id] = m
        else:
            m = self.seqs[sp.seq_id]
        assert sp.start_pos <= len(m.tokens), f"seq {sp.seq_id}: a gap before start_pos"
        del m.tokens[sp.start_pos :]
        del m.table[-(-sp.start_pos // bs) :]
        assert not set(sp.new_block_ids) & set(m.table), "a block appended twice"
        m.table.extend(sp.new_block_ids)
        end = sp.start_pos + len(sp.token_ids) + sp.num_draft
        assert len(m.table) == -(-end // bs), (
            f"seq {sp.seq_id}: {len(m.table)} blocks for a window ending at {end}"
        )
        assert sp.num_draft == 0 or sp.sample, "drafts on a step that does not sample"
        if self.draft_model:
            assert not sp.draft_token_ids, "the engine proposes, the plan must not"
        else:
            assert len(sp.draft_token_ids) == sp.num_draft
        return m

    def _write(self, m: SpecMirror, pos: int, tok: int) -> None:
        bs = self.info.block_size
        self.kv[m.table[pos // bs]][pos % bs] = tok

    def _context(self, m: SpecMirror, n: int) -> list[int]:
        """The first n tokens, read back from the KV cache through the block table."""
        bs = self.info.block_size
        ctx = [self.kv[m.table[p // bs]][p % bs] for p in range(n)]
        assert ctx == m.tokens[:n], "the KV cache does not hold the sequence's tokens"
        return ctx  # type: ignore[return-value]

    def _draft(self, ctx: list[int]) -> int:
        tok = self.next_token(ctx)
        return tok if self.draft_is_right(ctx) else 1 + tok % (VOCAB - 1)

    def _run(self, sp: SeqPlan, m: SpecMirror) -> SeqResult | None:
        for tok in sp.token_ids:
            self._write(m, len(m.tokens), tok)
            m.tokens.append(tok)
        if not sp.sample:
            return None
        base = len(m.tokens)
        drafts = list(sp.draft_token_ids)
        if self.draft_model:
            for _ in range(sp.num_draft):
                drafts.append(self._draft(m.tokens + drafts))
        for tok in drafts:
            self._write(m, len(m.tokens), tok)
            m.tokens.append(tok)
        out: list[int] = []
        for j in range(len(drafts) + 1):  # verify: the target's token after j drafts
            out.append(self.next_token(self._context(m, base + j)))
            if j == len(drafts) or out[-1] != drafts[j]:
                break
        res = SeqResult(sp.seq_id, out, num_accepted_drafts=len(out) - 1)
        if self.draft_model and self._draft_runs and sp.num_draft == 0 and sp.draft_catch_up:
            res.probe_accepted = self._draft(m.tokens[:base]) == out[0]
        return res
