"""GPU check, model sections: Tandem against transformers (greedy) on a random
Llama-shaped bf16 model, decode throughput with the fraction of HBM bandwidth, prefill
throughput with the fraction of bf16 peak.

Part of `python -m benchmarks.gpu_check`; needs only engine/ and kernels/ with torch,
triton and transformers. The model is built on the device, saved once to a temporary
directory and loaded through Tandem's own loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
import triton

from benchmarks.gpu_check_report import Section, sync
from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq
from tandem.engine.model_runner import ModelRunner

# ~1.1B parameters, Llama-3.2-1B-like but with a 32k vocabulary
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}  # fmt: skip
MARGIN = 0.1  # an HF top-1/top-2 logit gap below this is a near-tie (bf16 noise)
WINDOW = 4  # verify-window length (k + 1) of the teacher-forced check


def build_hf_model(size: str, device: torch.device, dtype: torch.dtype, out_dir):
    """A random Llama (HF, eval, on device) saved to out_dir; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **SIZES[size], max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.save_pretrained(str(out_dir))
    return model


def make_runner(model_dir, device, dtype: str, backend: str, kv_bytes: int) -> ModelRunner:
    return ModelRunner(
        EngineConfig(
            model=str(model_dir), dtype=dtype, device=str(device), block_size=16,
            kv_cache_memory=kv_bytes, max_model_len=4096, attention_backend=backend,
        )
    )  # fmt: skip


@dataclass
class Blocks:
    """Hands each sequence its own run of KV block ids."""

    block_size: int
    limit: int | None = None  # the KV pool's blocks
    next: int = 0

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        if self.limit is not None and self.next + n > self.limit:
            raise ValueError(f"the KV pool has {self.limit} blocks, this needs {self.next + n}")
        self.next += n
        return list(range(self.next - n, self.next))


def hf_greedy(model, prompt: list[int], n: int):
    """HF greedy continuation (full forward per token, no cache) and each step's
    top-1/top-2 logit gap."""
    ids = torch.tensor([prompt], device=model.device)
    tokens, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1].float()
            top = logits.topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, margins


def tandem_greedy(runner: ModelRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of all prompts, batched: one prefill step, then decodes."""
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(len(p) + n) for p in prompts]
    seqs = [RunSeq(p, 0, t, len(p) - 1) for p, t in zip(prompts, tables, strict=True)]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(n):
        logits = runner.execute(runner.build_input(seqs))
        for toks, tok in zip(out, logits.argmax(-1).tolist(), strict=True):
            toks.append(tok)
        seqs = [RunSeq([o[-1]], s.start_pos + len(s.token_ids), s.block_table, 0)
                for o, s in zip(out, seqs, strict=True)]  # fmt: skip
    return out


def tandem_windows(runner: ModelRunner, prompts, continuations) -> list[list[int]]:
    """Teacher-forced: prefill each prompt, then feed the HF continuation in windows of
    WINDOW tokens per step (uniform verify windows: the CUDA-graph path); the argmax
    after every fed token."""
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(len(p) + len(c)) for p, c in zip(prompts, continuations, strict=True)]
    seqs = [RunSeq(p, 0, t, len(p) - 1) for p, t in zip(prompts, tables, strict=True)]
    inp = runner.build_input(seqs)
    preds = runner.execute(inp).argmax(-1).view(-1, 1).tolist()
    for j in range(0, len(continuations[0]) - WINDOW + 1, WINDOW):
        seqs = [RunSeq(c[j : j + WINDOW], len(p) + j, t, 0)
                for p, c, t in zip(prompts, continuations, tables, strict=True)]  # fmt: skip
        logits = runner.execute(runner.build_input(seqs))
        rows = logits.argmax(-1).view(len(prompts), WINDOW).tolist()
        for pred, row in zip(preds, rows, strict=True):
            pred.extend(row)
    return preds


def graph_vs_eager(runner: ModelRunner, prompts, continuations) -> dict:
    """One uniform verify-window step replayed from its CUDA graph and run eagerly (all
    rewrite the same K/V): eagerly with the graph's attention plan (its metadata says
    max_seq_len = max_model_len, so the same split-K), which must agree bit for bit, and
    with eager's own plan (another float32 summation order). Returns the max abs logit
    differences, whether argmax agrees, and eager's smallest top-2 margin where it
    does not."""
    # bit-equality needs the eager step to be the graph's shape: a whole batch bucket
    assert runner.graphs is None or len(prompts) in runner.graphs.batch_sizes, len(prompts)
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(len(p) + WINDOW) for p in prompts]
    seqs = [RunSeq(p, 0, t, len(p)) for p, t in zip(prompts, tables, strict=True)]
    runner.execute(runner.build_input(seqs))
    seqs = [RunSeq(c[:WINDOW], len(p), t, 0)
            for p, c, t in zip(prompts, continuations, tables, strict=True)]  # fmt: skip
    inp = runner.build_input(seqs)
    replayed = runner.execute(inp).clone()
    same_plan = dataclasses.replace(
        inp, attn_meta=dataclasses.replace(inp.attn_meta, max_seq_len=runner.graphs.max_model_len)
    )
    graphs, runner.graphs = runner.graphs, None
    try:
        eager_same = runner.execute(same_plan).clone()
        eager = runner.execute(inp)
    finally:
        runner.graphs = graphs
    top = eager.float().topk(2, dim=-1).values
    flips = replayed.argmax(-1) != eager.argmax(-1)
    margins = (top[:, 0] - top[:, 1])[flips]
    return {
        "same_plan_diff": (replayed - eager_same).abs().max().item(),
        "diff": (replayed - eager).abs().max().item(),
        "argmax_equal": not bool(flips.any()),
        "flip_margin": margins.min().item() if len(margins) else None,
    }


def eager_fallback(section: Section, runner: ModelRunner, fn, *args):
    """fn(runner, *args); if it fails with CUDA graphs on, note why and retry eagerly
    (graphs stay off for the rest of the check)."""
    try:
        return fn(runner, *args)
    except Exception as e:
        if runner.graphs is None:
            raise
        section.note(f"ERROR with CUDA graphs, retrying eagerly: {type(e).__name__}: {e}"[:400])
        runner.graphs = None
        return fn(runner, *args)


def greedy_check(section: Section, hf, runner: ModelRunner, quick: bool, vocab: int) -> None:
    n = 16 if quick else 32
    g = torch.Generator().manual_seed(1)
    lengths = (17, 100) if quick else (17, 64, 100, 251)
    prompts = [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lengths]
    t0 = time.perf_counter()
    ref = [hf_greedy(hf, p, n) for p in prompts]
    t_hf = time.perf_counter() - t0
    hf_tokens = [r[0] for r in ref]
    ours = eager_fallback(section, runner, tandem_greedy, prompts, n)
    same, tie_only = 0, True
    for o, (h, margins) in zip(ours, ref, strict=True):
        if o == h:
            same += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(o, h, strict=True)) if a != b)
        tie_only &= margins[i] < MARGIN
        section.note(f"free run: first divergence at token {i}, HF top-2 margin {margins[i]:.3f}")
    detail = f"{n} tokens each, prompts {lengths}" + ("" if same == len(prompts) else
              f"; divergences {'only' if tie_only else 'NOT only'} at near-ties")  # fmt: skip
    section.add("free-run greedy, batched (prefill + decodes)",
                f"{same}/{len(prompts)} identical", detail, tie_only)  # fmt: skip
    preds = eager_fallback(section, runner, tandem_windows, prompts, hf_tokens)
    total = bad = ties = 0
    for pred, (h, margins) in zip(preds, ref, strict=True):
        for i in range(min(len(pred), len(h))):  # pred[i] predicts h[i]
            total += 1
            if pred[i] != h[i]:
                ties += margins[i] < MARGIN
                bad += margins[i] >= MARGIN
    section.add(f"teacher-forced, prefill + {WINDOW}-token verify windows",
                f"{total - bad - ties}/{total} argmax equal",
                f"{ties} at near-ties (HF margin < {MARGIN}), {bad} real", bad == 0)  # fmt: skip
    if runner.graphs is not None:
        r = graph_vs_eager(runner, prompts, hf_tokens)
        section.add("same window step: CUDA graph vs eager, same attention plan",
                    f"max logit diff {r['same_plan_diff']:.3g}", "must be 0 (same kernels)",
                    r["same_plan_diff"] == 0)  # fmt: skip
        flip = r["flip_margin"]
        detail = (
            "argmax equal" if flip is None else f"argmax flips at eager top-2 margin {flip:.3g}"
        )
        section.add("same window step: CUDA graph vs eager's own plan",
                    f"max logit diff {r['diff']:.3g}", detail,
                    flip is None or flip < 2 * r["diff"])  # fmt: skip
    section.note(f"HF reference: {t_hf:.1f}s; backend {runner.backend.name}, "
                 f"CUDA graphs {'on' if runner.graphs is not None else 'off'}")  # fmt: skip


def weight_bytes_per_step(runner: ModelRunner) -> int:
    """Bytes of parameters a decode step reads: all but the input embedding table."""
    total = 0
    for name, p in runner.model.named_parameters():
        if "embed_tokens" not in name or runner.model.args.tie_word_embeddings:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(runner: ModelRunner) -> int:
    cache = runner.kv_caches[0]
    return (
        2
        * runner.model.num_kv_heads
        * runner.model.head_dim
        * cache.element_size()
        * len(runner.kv_caches)
    )


def _prefill(runner: ModelRunner, tables, ctx: int, chunk_tokens: int) -> list[int]:
    """Prefill random prompts of ctx tokens into tables, chunk_tokens per step."""
    g = torch.Generator().manual_seed(2)
    last = []
    per_step = max(1, chunk_tokens // ctx)
    for i in range(0, len(tables), per_step):
        seqs = [RunSeq(torch.randint(3, 500, (ctx,), generator=g).tolist(), 0, t, ctx - 1)
                for t in tables[i : i + per_step]]  # fmt: skip
        last += runner.execute(runner.build_input(seqs)).argmax(-1).tolist()
    return last


def decode_throughput(section: Section, runner, batch: int, ctx: int, steps: int, copy_bw: float,
                      eager: bool = False, label: str | None = None) -> None:  # fmt: skip
    """Mean time of `steps` decode steps of `batch` sequences at ~ctx context: input
    building, forward, greedy pick and the step's one host sync included."""
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(ctx + steps + 4) for _ in range(batch)]
    tokens = _prefill(runner, tables, ctx, 16384)
    graphs, runner.graphs = runner.graphs, None if eager else runner.graphs
    try:
        pos, times = ctx, []
        for s in range(steps + 3):  # 3 warmup steps (graph capture, compilation)
            seqs = [RunSeq([t], pos, tb, 0) for t, tb in zip(tokens, tables, strict=True)]
            sync(runner.device)
            t0 = time.perf_counter()
            logits = runner.execute(runner.build_input(seqs))
            tokens = logits.argmax(-1).tolist()
            if s >= 3:
                times.append(time.perf_counter() - t0)
            pos += 1
    finally:
        runner.graphs = graphs
    step_s = sum(times) / len(times)
    step_bytes = weight_bytes_per_step(runner) + batch * (pos - steps // 2) * kv_bytes_per_token(
        runner
    )
    mode = label or ("eager" if eager or graphs is None else "graphs")
    section.add(batch, ctx, mode, step_s * 1e3,
                batch / step_s, step_bytes / 1e9, step_bytes / step_s / copy_bw)  # fmt: skip


def _first_plan(num_seqs, max_query_len, max_seq_len, num_kv_heads, group, head_dim, num_sms,
                elem_bytes: int = 2):  # fmt: skip
    """plan_attention as first written, before the H200 sweep (to compare with)."""
    from tandem.kernels import triton_attn as ta

    # the split count as tuned (it depends on rows per program, which differ from the
    # first plan's only for head_dim 128 with GQA groups of 16 or more: not measured here)
    tuned = _TUNED[0](num_seqs, max_query_len, max_seq_len, num_kv_heads, group, head_dim, num_sms,
                      elem_bytes)  # fmt: skip
    dim_p = triton.next_power_of_2(head_dim)
    cap = 64 if dim_p >= 256 else 128
    block_m = max(16, triton.next_power_of_2(group))
    block_m = min(max(block_m, triton.next_power_of_2(max_query_len * group)), max(cap, block_m))
    block_q = max(1, block_m // group)
    tile_n = 64 if block_m >= 64 and dim_p <= 128 else 32
    num_warps = 8 if block_m * dim_p >= 128 * 128 else 4
    return ta.AttnPlan(block_m, block_q, tile_n, tuned.num_splits, num_warps, 3)


@contextlib.contextmanager
def untuned_attention_plans(runner: ModelRunner):
    """Within: Triton attention plans as before the H200 sweep. CUDA graphs keep the
    plan they were captured with, so the runner gets a fresh set in a fresh memory pool
    (the tuned set is put back on exit; the untuned one is kept for the next round,
    never freed, as freeing graphs of a shared pool trips an allocator assert in torch
    2.11)."""
    from tandem.kernels import triton_attn as ta

    tuned = _TUNED[0] = ta.plan_attention
    graphs = runner.graphs
    saved = None if graphs is None else (graphs.graphs, graphs.pool)
    ta.plan_attention = _first_plan
    if graphs is not None:  # the untuned set of an earlier round, else a new one
        graphs.graphs, graphs.pool = _UNTUNED.get(id(graphs)) or (
            {},
            torch.cuda.graph_pool_handle(),
        )
    try:
        yield
    finally:
        ta.plan_attention = tuned
        if graphs is not None:
            _UNTUNED[id(graphs)] = (graphs.graphs, graphs.pool)
            graphs.graphs, graphs.pool = saved


_UNTUNED: dict = {}  # graph runner id -> its untuned (graphs, pool), kept for later rounds
_TUNED: list = [None]  # the real plan_attention while _first_plan stands in for it


def prefill_throughput(section: Section, runner, num_seqs: int, seq_len: int, peaks,
                       label: str = "") -> None:  # fmt: skip
    """num_seqs prompts of seq_len tokens in one step (logits for the last token each)."""
    blocks = Blocks(runner.block_size, runner.num_blocks)
    tables = [blocks.take(seq_len) for _ in range(num_seqs)]
    seqs = [RunSeq([3 + i % 400 for i in range(seq_len)], 0, t, seq_len - 1) for t in tables]

    def step():
        runner.execute(runner.build_input(seqs)).argmax(-1).tolist()

    step()
    reps, t0 = 3, time.perf_counter()
    for _ in range(reps):
        step()
    step_s = (time.perf_counter() - t0) / reps
    tokens = num_seqs * seq_len
    m = runner.model
    params = sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)
    attn = m.num_layers * num_seqs * 2 * m.args.num_heads * m.head_dim * seq_len**2
    flops = 2 * params * tokens + attn
    fracs = [f"{flops / step_s / p:.2f} of {p / 1e12:.0f}T {name}" for name, p in peaks if p]
    section.add(f"{num_seqs}x{seq_len}" + (f" ({label})" if label else ""), step_s * 1e3, tokens / step_s, flops / step_s / 1e12,
                "; ".join(fracs))  # fmt: skip
