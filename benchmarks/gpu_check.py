"""One script that checks Tandem on one GPU and prints a short Markdown table.

    python -m benchmarks.gpu_check --out gpu_check.md            # ~3-4 min on one H100
    python -m benchmarks.gpu_check --quick --out gpu_check.md    # fewer kernel cases, ~2-3 min
    python -m benchmarks.gpu_check --profile --sweep-s 100       # + where decode time goes,
                                                                 #   attention plan sweep
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check --device cpu --quick --model-size tiny
                                                                 # this script's own test

Sections (each one runs even when an earlier one failed; its error becomes a note):
  1. the card: name, versions, measured copy bandwidth and bf16 matmul FLOP/s
  2. every Triton kernel against the torch reference on the device (max abs error),
     and the flash-attn backend where flash_attn is installed
  3. Triton paged attention against torch SDPA on the same shapes (time)
  4. Tandem vs transformers greedy tokens on a random ~1.1B Llama-shaped bf16 model
  5. decode throughput at batch 1 (eager and CUDA graphs), 32 and 128, with the fraction
     of HBM bandwidth: (weights + KV read per step) / step time / measured copy bandwidth
  6. prefill tokens/s with the fraction of the bf16 peak (nominal and measured matmul)

Needs only engine/ and kernels/ (no fastapi, pydantic or flash-attn) with torch, triton
and transformers; installed with `pip install --no-deps --no-build-isolation -e .`. The
table is written to --out after every section, so a run cut short keeps its results.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import platform
import tempfile
import traceback
from pathlib import Path

import torch

from benchmarks import gpu_check_kernels as kernels
from benchmarks import gpu_check_model as model
from benchmarks import gpu_check_profile as profile
from benchmarks import gpu_check_worker as worker_check
from benchmarks.gpu_check_report import (
    Report,
    Section,
    copy_bandwidth,
    matmul_flops,
    nominal_bf16_peak,
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_section(section: Section, device: torch.device, state: dict) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    section.add("device", f"{device}: {name or 'cpu'}")
    section.add("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"))
    for pkg in ("torch", "triton", "transformers", "flash-attn"):
        section.add(pkg, _version(pkg))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        section.add(
            "SMs / memory", f"{props.multi_processor_count} / {props.total_memory / 2**30:.0f} GiB"
        )
    state["copy_bw"] = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    section.add("measured copy bandwidth", f"{state['copy_bw'] / 1e12:.3f} TB/s (read + write)")
    n = 8192 if device.type == "cuda" else 512
    state["matmul"] = matmul_flops(device, torch.bfloat16, n)
    section.add(f"measured bf16 matmul {n}^3", f"{state['matmul'] / 1e12:.1f} TFLOP/s")
    state["nominal"] = nominal_bf16_peak(device)
    if state["nominal"]:
        section.add("nominal dense bf16 peak", f"{state['nominal'] / 1e12:.0f} TFLOP/s")


def kernel_section(section: Section, device: torch.device, quick: bool) -> None:
    # one kernel failing must not hide the rest
    _noted(section, "write_kv", kernels.check_write_kv, section, device)
    _noted(section, "rotate_and_write_kv", kernels.check_rope_kv, section, device)
    _noted(section, "elementwise", kernels.check_elementwise, section, device)
    _noted(section, "attention", kernels.check_attention, section, device, quick)
    _noted(section, "flash_attn", kernels.check_flash_attn, section, device)


def model_section(section: Section, args, device: torch.device, state: dict, tmp: Path):
    """Build the random model (HF on the device, saved once) and Tandem's runner."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    hf = model.build_hf_model(args.model_size, device, dtype, tmp)
    size = model.SIZES[args.model_size]
    head_dim = size["hidden_size"] // size["num_attention_heads"]
    per_block = 2 * size["num_hidden_layers"] * size["num_key_value_heads"] * head_dim * 16
    per_block *= 2 if dtype == torch.bfloat16 else 4
    max_blocks = max(b * -(-(args.ctx + args.steps + 16) // 16) for b in args.batches)
    max_blocks = max(max_blocks, args.prefill[0] * -(-args.prefill[1] // 16), 256)
    try:
        runner = model.make_runner(tmp, device, args.dtype, args.backend, max_blocks * per_block)
    except Exception as e:  # noqa: BLE001 - measure with the reference kernels instead
        section.note(f"ERROR with backend {args.backend} ({type(e).__name__}: {e}"[:300] + ")")
        section.note("falling back to the torch backend: rows below measure it")
        runner = model.make_runner(tmp, device, args.dtype, "torch", max_blocks * per_block)
    params = sum(p.numel() for p in runner.model.parameters())
    section.add("parameters", f"{params / 1e9:.3f} B ({args.model_size}, {args.dtype})")
    section.add("attention backend", runner.backend.name)
    section.add("CUDA graphs", "on" if runner.graphs is not None else "off")
    section.add("KV blocks", f"{runner.num_blocks} x 16 tokens")
    state["hf"], state["runner"] = hf, runner
    state["model_dir"], state["kv_bytes"] = tmp, max_blocks * per_block


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument("--quick", action="store_true", help="fewer cases and steps")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: script test)")
    p.add_argument("--model-size", choices=sorted(model.SIZES), default="1b")
    p.add_argument("--backend", default="triton", help="Tandem attention backend to run")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip sections past this")
    p.add_argument(
        "--compare-plans",
        action="store_true",
        help="decode also with the attention tiles from before their tuning",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="add a decode-step breakdown (host, device, profiler kernels)",
    )
    p.add_argument(
        "--sweep-s",
        type=float,
        default=0.0,
        help="add a Triton attention launch-plan sweep of at most this many s",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.dtype = "float32" if cpu else "bfloat16"
    args.ctx, args.steps = (64, 4) if cpu else (512, 16 if args.quick else 32)
    args.batches = [1, 4] if cpu else [1, 32, 128]
    args.prefill = (2, 64) if cpu else ((4, 2048) if args.quick else (8, 2048))
    report = Report(f"Tandem GPU check ({args.device}{', quick' if args.quick else ''})",
                    args.out, args.budget_s)  # fmt: skip
    state: dict = {}
    report.run("Device", ["measure", "value"], lambda s: device_section(s, device, state))
    report.run(
        "Kernels vs torch reference on the device (max abs error)",
        ["kernel", "case", "max err", "tol", "ok"],
        lambda s: kernel_section(s, device, args.quick),
        need_s=20,
    )
    report.run(
        "Triton paged attention vs torch SDPA, same shapes (median ms)",
        ["shape", "triton ms", "SDPA ms", "SDPA / triton", "graph: triton", "graph: SDPA",
         "graph ratio"],
        lambda s: kernels.attention_vs_sdpa(s, device, args.quick),
        need_s=15,
    )  # fmt: skip
    if args.sweep_s > 0:
        csv = None if args.out is None else args.out.with_suffix(".sweep.csv")
        header = ["shape", "default plan", "default ms", "best plan", "best ms", "SDPA ms",
                  "plans tried"]  # fmt: skip
        report.run("Triton attention launch plans (CUDA-graph replay, ms)", header,
                   lambda s: kernels.attention_sweep(s, device, args.sweep_s, csv))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-check-") as tmp:
        report.run("Model", ["measure", "value"], lambda s: model_section(s, args, device, state, Path(tmp)), need_s=40)  # fmt: skip
        _model_sections(report, args, state)
    print("\n" + report.render(), flush=True)


def _noted(section: Section, label: str, fn, *args) -> None:
    """fn(*args); an exception becomes a note on section."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        section.note(f"ERROR {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


def _model_sections(report: Report, args, state: dict) -> None:
    def need_runner(fn):
        def run(section):
            if "runner" not in state:
                raise RuntimeError("no model: the Model section failed")
            fn(section, state["runner"])

        return run

    def greedy(section, runner):
        vocab = model.SIZES[args.model_size]["vocab_size"]
        model.greedy_check(section, state.pop("hf"), runner, args.quick, vocab)

    report.run("Greedy tokens vs transformers", ["check", "result", "detail", "ok"], need_runner(greedy), need_s=20)  # fmt: skip
    state.pop("hf", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def decode(section, runner):
        copy_bw = state.get("copy_bw") or copy_bandwidth(runner.device)
        runs = [(1, True)] + [(batch, False) for batch in args.batches]
        for batch, eager in runs:  # one failing batch size must not hide the others
            _noted(section, f"batch {batch}", model.decode_throughput, section, runner, batch,
                   args.ctx, args.steps, copy_bw, eager)  # fmt: skip
        if args.compare_plans and runner.backend.name == "triton":
            # alternating rounds: untuned, tuned again, twice (drift hits both alike)
            mode = "graphs" if runner.graphs else "eager"
            for r in (1, 2):
                with model.untuned_attention_plans(runner):
                    for batch in args.batches:
                        _noted(section, f"batch {batch}, untuned plans", model.decode_throughput,
                               section, runner, batch, args.ctx, args.steps, copy_bw, False,
                               f"{mode}, untuned attention ({r})")  # fmt: skip
                for batch in args.batches:
                    _noted(section, f"batch {batch}", model.decode_throughput, section, runner,
                           batch, args.ctx, args.steps, copy_bw, False, f"{mode} (again, {r})")  # fmt: skip

    header = ["batch", "ctx", "mode", "step ms", "tok/s", "GB read/step", "of copy BW"]
    report.run("Decode throughput (greedy, host sync per step)", header, need_runner(decode), need_s=20)  # fmt: skip

    def overlapped(section, runner):
        copy_bw = state.get("copy_bw") or copy_bandwidth(runner.device)
        worker = worker_check.make_worker(state["model_dir"], runner.device, args.dtype,
                                          runner.backend.name, state["kv_bytes"])  # fmt: skip
        try:
            for batch in args.batches:
                _noted(section, f"batch {batch}", worker_check.worker_decode, section, worker,
                       batch, args.ctx, args.steps, copy_bw)  # fmt: skip
            _noted(section, "sampled", worker_check.worker_decode, section, worker,
                   args.batches[0], args.ctx, args.steps, copy_bw, True)  # fmt: skip
        finally:
            del worker
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    header = ["batch", "mode", "step ms", "tok/s", "of copy BW", "guesses taken / dropped",
              "syncs (overlap on)", "tokens = plain"]  # fmt: skip
    report.run("Decode through the worker: overlapped steps off / on", header,
               need_runner(overlapped), need_s=30)  # fmt: skip

    def prefill(section, runner):
        peaks = [("nominal", state.get("nominal")), ("measured matmul", state.get("matmul"))]
        model.prefill_throughput(section, runner, *args.prefill, peaks)
        if args.compare_plans and runner.backend.name == "triton":
            with model.untuned_attention_plans(runner):
                model.prefill_throughput(section, runner, *args.prefill, peaks, "untuned attention")
            model.prefill_throughput(section, runner, *args.prefill, peaks, "again")

    header = ["seqs x tokens", "step ms", "tok/s", "TFLOP/s", "fraction of bf16 peak"]
    report.run("Prefill throughput", header, need_runner(prefill), need_s=10)

    if args.profile:

        def breakdown(section, runner):
            for batch in (args.batches[0], args.batches[-1]):
                _noted(section, f"batch {batch}", profile.decode_breakdown, section, runner,
                       batch, args.ctx, args.steps)  # fmt: skip

        header = ["batch", "what", "ms / step", "detail"]
        report.run("Decode step breakdown", header, need_runner(breakdown), need_s=15)


if __name__ == "__main__":
    main()
