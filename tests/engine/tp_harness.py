"""Run a Worker on N CPU ranks (spawned processes, gloo) and greedy-generate with it.

Not a test module: imported by tests/engine/test_tp_*.py. Every process started here is
joined, and killed if it outlives its deadline.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import pickle
import queue
import socket
import traceback
from dataclasses import dataclass

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.engine.parallel import ParallelConfig
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan
from tandem.engine.worker import Worker

BLOCK_SIZE = 4
CHUNK = 3  # prompt tokens per prefill step


@dataclass(slots=True)
class RankOutput:
    """What one rank computed (picklable back to the test)."""

    rank: int  # the rank that computed it
    tokens: list[list[int]]  # generated tokens per request
    logits: list[torch.Tensor]  # per request (len(prompt + tokens), V) float32 logits
    num_blocks: int  # the rank's KV block count
    num_kv_heads: int  # the rank's KV heads per layer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config(model_dir: str | None, num_threads: int | None = None) -> EngineConfig:
    return EngineConfig(
        model=model_dir,
        dtype="float32",
        device="cpu",
        block_size=BLOCK_SIZE,
        kv_cache_memory="2MiB",
        max_model_len=64,
        num_threads=num_threads,
    )


def generate(worker: Worker, prompts: list[list[int]], samplings: list[SamplingParams]):
    """Prefill the prompts in chunks of CHUNK tokens (decodes of the sequences that are
    done piggybacking on later chunks), then decode until each has max_tokens tokens.

    Returns (tokens per request, next free block id)."""
    next_block = 0
    tables: list[list[int]] = []
    for prompt, sp in zip(prompts, samplings, strict=True):
        n = -(-(len(prompt) + sp.max_tokens) // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    outs: list[list[int]] = [[] for _ in prompts]
    computed = [0] * len(prompts)  # tokens in the KV cache per sequence
    for step in itertools.count():
        seqs = []
        for i, (prompt, sp) in enumerate(zip(prompts, samplings, strict=True)):
            if len(outs[i]) >= sp.max_tokens:
                continue
            pos = computed[i]
            ids = prompt[pos : pos + CHUNK] if pos < len(prompt) else [outs[i][-1]]
            new = NewSeq(sampling=sp, num_prompt_tokens=len(prompt)) if pos == 0 else None
            sample = pos + len(ids) >= len(prompt)
            blocks = _blocks(tables[i], pos, len(ids))
            seqs.append(SeqPlan(i, ids, pos, blocks, sample, new=new))
            computed[i] = pos + len(ids)
        if not seqs:
            return outs, next_block
        for r in worker.execute(StepPlan(step_id=step, seqs=seqs)).seqs:
            outs[r.seq_id].extend(r.token_ids)
    return outs, next_block  # not reached: the loop returns once all are done


def _blocks(table: list[int], start_pos: int, n: int) -> list[int]:
    """The blocks a run of n tokens at start_pos adds to the ceil(start_pos/B) it has."""
    return table[-(-start_pos // BLOCK_SIZE) : -(-(start_pos + n) // BLOCK_SIZE)]


def full_logits(worker: Worker, token_ids: list[int], first_block: int) -> torch.Tensor:
    """(len(token_ids), V) logits of one fresh forward over token_ids."""
    runner = worker.runner
    table = list(range(first_block, first_block + -(-len(token_ids) // BLOCK_SIZE)))
    inp = build_model_input([RunSeq(token_ids, 0, table, 0)], BLOCK_SIZE, runner.device)
    return runner.execute(inp).cpu()


def run_rank(
    model_dir, prompts, samplings, parallel: ParallelConfig, num_threads: int | None = None
) -> RankOutput:
    """Build a Worker for one rank, generate, and score prompt + output in full."""
    worker = Worker(engine_config(model_dir, num_threads), parallel=parallel)
    try:
        tokens, next_block = generate(worker, prompts, samplings)
        logits = [
            full_logits(worker, p + t, next_block) for p, t in zip(prompts, tokens, strict=True)
        ]
        worker.tp_group.barrier()
        return RankOutput(
            parallel.rank,
            tokens,
            logits,
            worker.runner.num_blocks,
            worker.runner.model.num_kv_heads,
        )
    finally:
        worker.tp_group.destroy()


def _spawned(fn, rank, world_size, init_method, args, results) -> None:
    try:
        out = fn(rank, world_size, init_method, *args)
        # plain pickle: mp's tensor reduction would pass fds that die with this process
        results.put((rank, pickle.dumps(out), None))
    except BaseException:  # report any failure to the test instead of hanging it
        results.put((rank, None, traceback.format_exc()))


def spawn_ranks(fn, args: tuple = (), world_size: int = 2, timeout_s: float = 90.0) -> list:
    """fn(rank, world_size, init_method, *args) on world_size spawned processes (fn
    importable at module level) -> their results in rank order. A rank that raises or
    a run past timeout_s fails the caller; every process is joined or killed."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_spawned, args=(fn, r, world_size, init, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outs = {}
        for _ in procs:
            rank, out, error = results.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            outs[rank] = pickle.loads(out)
        return [outs[r] for r in range(world_size)]
    except queue.Empty:
        raise TimeoutError(f"TP ranks did not finish within {timeout_s}s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _tp_rank(rank, world_size, init_method, model_dir, prompts, samplings) -> RankOutput:
    pc = ParallelConfig(world_size=world_size, rank=rank, init_method=init_method)
    return run_rank(model_dir, prompts, samplings, pc, num_threads=1)


def run_tp(model_dir, prompts, samplings, world_size: int = 2, timeout_s: float = 90.0):
    """run_rank on world_size spawned processes -> [RankOutput] in rank order."""
    return spawn_ranks(_tp_rank, (model_dir, prompts, samplings), world_size, timeout_s)
