"""GPU check, kernel sections: every Triton kernel against the torch reference (max
error), the flash-attn backend where installed, and Triton paged attention against
torch SDPA on contiguous tensors (time).

Part of `python -m benchmarks.gpu_check`; needs only engine/ and kernels/ with torch
and triton.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu_check_report import Section, bench_graph_ms, bench_ms
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.kernels import torch_ref

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {FP32: 1e-4, FP16: 4e-3, BF16: 3e-2}  # attention: max abs error (outputs |x| < ~3)
RTOL = {FP16: 2**-9, BF16: 2**-7}  # elementwise ops: |err| <= RTOL * (1 + |ref|), ~2 ulp
# decodes over long contexts, a 300-token prompt, a chunk over context, verify windows
MIXED = [(700, 1), (0, 300), (129, 64), (2047, 1), (40, 4), (999, 6), (17, 1), (0, 1)]
LONG = [(4095, 1), (3000, 4), (6000, 1)]  # few queries, long contexts: split-K
# CPU runs (Triton's interpreter, to test this script) use small shapes
SMALL_MIXED = [(70, 1), (0, 30), (19, 6), (5, 4), (0, 1)]
SMALL_LONG = [(300, 1), (200, 4)]
ATTN_CASES = [  # block_size, Hq, Hkv, D, dtype
    (16, 32, 8, 64, BF16),
    (16, 32, 8, 128, BF16),
    (32, 32, 4, 128, FP16),
    (16, 28, 4, 128, BF16),  # GQA group of 7
    (16, 16, 16, 80, FP16),
    (32, 8, 1, 96, BF16),
    (16, 8, 2, 256, BF16),
]


def make_batch(runs, block_size, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """(meta, head-major cache, q) with every slot random, block tables shuffled."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(start + n) // block_size) for start, n in runs]
    num_blocks = sum(need) + 1
    perm = torch.randperm(num_blocks, generator=g).tolist()
    seqs = [
        RunSeq([0] * n, start, [perm.pop() for _ in range(nb)], n)
        for (start, n), nb in zip(runs, need, strict=True)
    ]
    meta = build_model_input(seqs, block_size, device).attn_meta
    shape = torch_ref.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=g).to(device, dtype)
    return meta, cache, q


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return (out.float() - ref.float()).abs().max().item()


def _check(section: Section, kernel: str, case: str, err: float, tol: float) -> None:
    section.add(kernel, case, f"{err:.2e}", f"{tol:.0e}", bool(err <= tol))


def _check_rel(section: Section, kernel: str, case: str, out, ref, rtol: float) -> None:
    """Pass when |out - ref| <= rtol * (1 + |ref|) everywhere; shows the max abs error."""
    diff = (out.float() - ref.float()).abs()
    ok = bool((diff <= rtol * (1 + ref.float().abs())).all()) and not out.isnan().any()
    section.add(kernel, case, f"{diff.max().item():.2e}", f"{rtol:.0e}(1+|ref|)", ok)


def check_attention(section: Section, device: torch.device, quick: bool) -> None:
    from tandem.kernels import triton_attn as ta

    small = device.type == "cpu"
    batches = (("mixed", SMALL_MIXED if small else MIXED), ("long", SMALL_LONG if small else LONG))
    for block_size, hq, hkv, d, dtype in ATTN_CASES[:3] if quick else ATTN_CASES:
        for name, runs in batches:
            meta, cache, q = make_batch(runs, block_size, hq, hkv, d, dtype, device)
            out = torch.full_like(q, float("nan"))
            ta.paged_attention(
                q, ta.head_major(cache), meta.query_start_loc, meta.seq_lens, meta.block_tables,
                meta.max_query_len, meta.max_seq_len, d**-0.5, out=out,
            )  # fmt: skip
            ref = torch_ref.paged_attention(q.float(), cache.float(), meta, d**-0.5)
            plan = ta.plan_attention(
                meta.seq_lens.shape[0], meta.max_query_len, meta.max_seq_len, hkv, hq // hkv,
                d, ta.num_sms(device),
            )  # fmt: skip
            case = (
                f"{name} bs{block_size} {hq}/{hkv}h d{d} {str(dtype)[6:]} splits{plan.num_splits}"
            )
            _check(section, "paged_attention", case, _max_err(out, ref), TOL[dtype])


def check_write_kv(section: Section, device: torch.device) -> None:
    from tandem.kernels import triton_attn as ta

    for layout in ("head_major", "token_major"):
        num_blocks, block_size, hkv, d = 64, 16, 8, 128
        shape = (2, num_blocks, hkv, block_size, d)
        if layout == "token_major":
            shape = (2, num_blocks, block_size, hkv, d)
        cache = torch.full(shape, float("nan"), dtype=BF16, device=device)
        expect = cache.clone()
        k, v = torch.randn(2, 300, hkv, d, device=device, dtype=BF16).unbind(0)
        slots = torch.randperm(num_blocks * block_size, device=device)[:300]
        slots[::7] = -1  # CUDA-graph pads: skipped
        ta.write_kv(k, v, getattr(ta, layout)(cache), slots)
        keep = slots >= 0
        blocks, offs = slots[keep] // block_size, slots[keep] % block_size
        if layout == "head_major":
            expect[0, blocks, :, offs], expect[1, blocks, :, offs] = k[keep], v[keep]
        else:
            expect[0, blocks, offs], expect[1, blocks, offs] = k[keep], v[keep]
        same = torch.equal(cache.nan_to_num(7.0), expect.nan_to_num(7.0))
        section.add("write_kv", f"{layout} bf16, 1/7 pad slots", "exact" if same else "DIFF",
                    "exact", same)  # fmt: skip


def check_rope_kv(section: Section, device: torch.device) -> None:
    """The fused rotary + KV write against rotate_neox then write_kv: bit-identical."""
    from tandem.kernels import triton_attn as ta
    from tandem.kernels import triton_ops
    from tandem.kernels.triton_rope_kv import rotate_and_write_kv

    t, hq, hkv, d, num_blocks, block_size = 300, 32, 8, 128, 64, 16
    for layout in ("head_major", "token_major"):
        shape = (2, num_blocks, hkv, block_size, d)
        if layout == "token_major":
            shape = (2, num_blocks, block_size, hkv, d)
        ref = torch.full(shape, 7.0, dtype=BF16, device=device)
        cache = ref.clone()
        qkv = torch.randn(t, hq + 2 * hkv, d, device=device, dtype=BF16)
        angle = torch.rand(t, d // 2, device=device) * 6.28
        cos, sin = angle.cos().to(BF16), angle.sin().to(BF16)
        slots = torch.randperm(num_blocks * block_size, device=device)[:t]
        slots[::7] = -1
        view = getattr(ta, layout)
        qk = triton_ops.rotate_neox(qkv[:, : hq + hkv], cos, sin)
        ta.write_kv(qk[:, hq:], qkv[:, hq + hkv :], view(ref), slots)
        q = rotate_and_write_kv(qkv, hq, cos, sin, view(cache), slots)
        same = torch.equal(q, qk[:, :hq]) and torch.equal(cache, ref)
        section.add("rotate_and_write_kv", f"{layout} bf16 32/8h d128, vs the two kernels",
                    "exact" if same else "DIFF", "exact", same)  # fmt: skip


def check_elementwise(section: Section, device: torch.device) -> None:
    from tandem.kernels import triton_ops

    g = torch.Generator().manual_seed(0)
    rows = 16 if device.type == "cpu" else 512
    for dtype in (BF16, FP16):

        def rnd(*shape, dtype=dtype):
            return torch.randn(*shape, generator=g).to(device, dtype)

        x, res, w = rnd(rows, 2048), rnd(rows, 2048), 1 + 0.1 * rnd(2048)
        # Triton's interpreter (cpu) truncates to bf16/fp16 where a GPU rounds to nearest
        rtol = RTOL[dtype] * (2 if device.type == "cpu" else 1)
        tag = f"{rows} rows {str(dtype)[6:]}"
        f = [t.float() for t in (x, res, w)]  # references in float32 over the same inputs
        out = triton_ops.rms_norm(x, w, 1e-5)
        _check_rel(
            section, "rms_norm", f"x2048, {tag}", out, torch_ref.rms_norm(f[0], f[2], 1e-5), rtol
        )
        out, new_res = triton_ops.rms_norm_residual(x, res, w, 1e-5)
        ref_out, ref_res = torch_ref.rms_norm_residual(*f, 1e-5)
        _check_rel(section, "rms_norm_residual", f"x2048, {tag}", out, ref_out, rtol)
        _check_rel(section, "  its residual sum", f"x2048, {tag}", new_res, ref_res, rtol)
        qkv = rnd(rows, (32 + 16) * 64)
        xr = qkv[:, : 40 * 64].view(rows, 40, 64)
        angles = 100 * torch.rand(rows, 32, generator=g)
        cos, sin = torch.cat((angles.cos(), angles.sin()), -1).to(device, dtype).chunk(2, -1)
        out = triton_ops.rotate_neox(xr, cos, sin)
        ref = torch_ref.rotate_neox(xr.float(), cos.float(), sin.float())
        _check_rel(section, "rotate_neox", f"qkv view x40x64, {tag}", out, ref, rtol)
        gu = rnd(rows, 2 * 8192)
        out, ref = triton_ops.silu_and_mul(gu), torch_ref.silu_and_mul(gu.float())
        _check_rel(section, "silu_and_mul", f"x8192, {tag}", out, ref, rtol)


def check_flash_attn(section: Section, device: torch.device) -> None:
    """The flash-attn backend on its layout (block 256) against the torch reference."""
    if importlib.util.find_spec("flash_attn") is None:
        section.note("flash_attn is not installed: flash-attn backend not checked")
        return
    from tandem.kernels.flash_attn import FlashAttnBackend as Flash

    meta, cache, q = make_batch(MIXED, 256, 32, 8, 128, BF16, device)
    token_major = cache.transpose(2, 3).contiguous()
    out = Flash.paged_attention(q, token_major, Flash.prepare(meta, token_major), 128**-0.5)
    ref = torch_ref.paged_attention(q.float(), cache.float(), meta, 128**-0.5)
    err = _max_err(out, ref)
    _check(section, "flash_attn backend", "mixed bs256 32/8h d128 bf16", err, TOL[BF16])


def _sdpa(q, k, v, causal: bool):
    """torch SDPA, flash backend when it accepts the call; returns (fn, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    attempts = [
        ("flash+gqa", SDPBackend.FLASH_ATTENTION, k, v, group > 1),
        ("flash", SDPBackend.FLASH_ATTENTION, *(t.repeat_interleave(group, 1) for t in (k, v)), False),
        ("default", None, *(t.repeat_interleave(group, 1) for t in (k, v)), False),
    ]  # fmt: skip
    for name, backend, kk, vv, gqa in attempts:

        def fn(kk=kk, vv=vv, gqa=gqa, backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)

        try:
            fn()
            return fn, name
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend accepted the shapes")


SDPA_SHAPES = [  # name, num_seqs, context, query len, Hq, Hkv, D
    ("prefill", 4, 2048, 2048, 32, 8, 128),
    ("prefill", 4, 2048, 2048, 32, 8, 64),
    ("decode", 32, 2048, 1, 32, 8, 128),
    ("decode", 128, 1024, 1, 32, 8, 64),
    ("decode", 1, 8192, 1, 32, 8, 128),
]
SMALL_SHAPES = [("prefill", 2, 64, 64, 4, 2, 64), ("decode", 4, 200, 1, 4, 2, 64)]


def _attention_case(device, name, num_seqs, ctx, qlen, hq, hkv, d):
    """(shape label, triton_fn(plan=None), sdpa_fn, sdpa backend, default plan)."""
    from tandem.kernels import triton_attn as ta

    runs = [(ctx - qlen, qlen)] * num_seqs
    meta, cache, q = make_batch(runs, 16, hq, hkv, d, BF16, device)
    pages, scale = ta.head_major(cache), d**-0.5

    def triton_fn(plan=None):
        return ta.paged_attention(
            q, pages, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.max_query_len, meta.max_seq_len, scale, plan=plan,
        )  # fmt: skip

    qs = q.view(num_seqs, qlen, hq, d).transpose(1, 2)
    k, v = torch.randn(2, num_seqs, hkv, ctx, d, device=device, dtype=BF16).unbind(0)
    sdpa_fn, backend = _sdpa(qs, k, v, causal=qlen > 1)
    plan = ta.plan_attention(num_seqs, qlen, ctx, hkv, hq // hkv, d, ta.num_sms(device))
    label = f"{name} {num_seqs}x{qlen} q, ctx {ctx}, {hq}/{hkv}h d{d} bf16"
    return label, triton_fn, sdpa_fn, backend, plan


def attention_vs_sdpa(section: Section, device: torch.device, quick: bool) -> None:
    """Same shapes: Triton over shuffled 16-token pages vs SDPA over contiguous K/V; each
    timed host-synced per call (launch overhead in) and replayed from a CUDA graph (the
    device time alone, as the engine's decode steps run)."""
    shapes = SMALL_SHAPES if device.type == "cpu" else SDPA_SHAPES
    for shape in shapes[::2] if quick else shapes:
        label, triton_fn, sdpa_fn, backend, _ = _attention_case(device, *shape)
        t_triton, t_sdpa = bench_ms(triton_fn, device), bench_ms(sdpa_fn, device)
        g_triton, g_sdpa = bench_graph_ms(triton_fn, device), bench_graph_ms(sdpa_fn, device)
        section.add(label, f"{t_triton:.3f}", f"{t_sdpa:.3f} ({backend})", t_sdpa / t_triton,
                    f"{g_triton:.4f}", f"{g_sdpa:.4f}", g_sdpa / g_triton)  # fmt: skip


def _sweep_plans(plan, qlen: int) -> list:
    """Launch plans around `plan`: key-tile width, warps and pipelining depth, and for
    long runs rows per program."""
    if qlen <= 8:
        grid = [dict(tile_n=n, num_stages=st) for n in (32, 64, 128) for st in (1, 2, 3)]
        grid += [dict(tile_n=n, num_stages=2, num_warps=w) for n in (64, 128) for w in (2, 8)]
    else:
        group = plan.block_m // plan.block_q
        grid = [dict(block_m=m, block_q=m // group, tile_n=n, num_warps=w, num_stages=st)
                for m in (64, 128) for n in (32, 64) for w in (4, 8) for st in (2, 3)]  # fmt: skip
    plans = [dataclasses.replace(plan, **change) for change in grid]
    return [p for i, p in enumerate(plans) if p != plan and p not in plans[:i]]


SWEEP_SHAPES = [  # the 1.1B model's decode shapes (d64; graphs plan for 4096 keys), then SDPA's
    ("decode", 128, 512, 1, 32, 8, 64),
    ("decode", 32, 512, 1, 32, 8, 64),
    ("decode", 1, 512, 1, 32, 8, 64),
    ("decode", 32, 2048, 1, 32, 8, 128),
    ("decode", 1, 8192, 1, 32, 8, 128),
    ("prefill", 4, 2048, 2048, 32, 8, 128),
    ("prefill", 4, 2048, 2048, 32, 8, 64),
]


def attention_sweep(section: Section, device: torch.device, budget_s: float = 100.0,
                    csv_path=None) -> None:  # fmt: skip
    """Graph-replayed time of each plan around the default one, per shape: the default's
    time, the best plan and its time, SDPA's (configs that fail to compile are counted and
    skipped; the sweep stops at budget_s). Every plan's time goes to csv_path."""
    from tandem.kernels import triton_attn as ta

    t_end = time.perf_counter() + budget_s
    shapes = SMALL_SHAPES if device.type == "cpu" else SWEEP_SHAPES
    lines = ["shape,plan,ms"]
    for shape in shapes:
        label, triton_fn, sdpa_fn, _, plan = _attention_case(device, *shape)
        if shape[3] == 1 and shape[2] <= 512:  # as captured in a graph: tiles for 4096 keys
            _, num_seqs, _, _, hq, hkv, d = shape
            plan = ta.plan_attention(num_seqs, 1, 4096, hkv, hq // hkv, d, ta.num_sms(device))
        base = bench_graph_ms(lambda fn=triton_fn, p=plan: fn(p), device)
        sdpa = bench_graph_ms(sdpa_fn, device)
        lines += [f'"{label}",default {_plan_text(plan)},{base:.5f}', f'"{label}",SDPA,{sdpa:.5f}']
        plans = _sweep_plans(plan, shape[3])
        if device.type == "cpu":
            plans = plans[:2]
        best, best_ms, failed, tried = plan, base, 0, 0
        for p in plans:
            if time.perf_counter() > t_end:
                break
            tried += 1
            try:
                ms = bench_graph_ms(lambda p=p, fn=triton_fn: fn(p), device)
            except Exception:  # noqa: BLE001 - out of shared memory, registers, ...
                failed += 1
                lines.append(f'"{label}",{_plan_text(p)},failed')
                continue
            lines.append(f'"{label}",{_plan_text(p)},{ms:.5f}')
            if ms < best_ms:
                best, best_ms = p, ms
        section.add(label, _plan_text(plan), f"{base:.4f}", _plan_text(best), f"{best_ms:.4f}",
                    f"{sdpa:.4f}", f"{tried}/{len(plans)} ({failed} failed)")  # fmt: skip
        if csv_path is not None:
            csv_path.write_text("\n".join(lines) + "\n")


def _plan_text(p) -> str:
    return f"m{p.block_m} q{p.block_q} n{p.tile_n} s{p.num_splits} w{p.num_warps} st{p.num_stages}"
