"""`tandem bench serve` against a real Tandem server: a short Poisson run over
/v1/completions and a concurrency run over /v1/chat/completions."""

from __future__ import annotations

import json

from openai_server_harness import TandemServer, require_builtin_model

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.server.bench_workload import (
    TokenizerPrompts,
    WorkloadSpec,
    build_workload,
    parse_arrival,
    parse_length,
)
from tandem.server.cli import main as cli_main


def test_bench_serve_against_tandem(tmp_path, capsys):
    require_builtin_model()
    with TandemServer() as srv:
        common = ["--base-url", srv.base_url, "--no-progress", "--seed", "1"]
        out = tmp_path / "completions.json"
        argv = ["bench", "serve", *common, "--num-prompts", "6", "--tokenizer", str(BUILTIN_TARGET)]
        argv += ["--input-len", "mixed:8:64:0.3", "--output-len", "uniform:4:12"]
        argv += ["--arrival", "poisson:20", "--goodput", "ttft:60000", "tpot:60000"]
        assert cli_main([*argv, "--result-json", str(out)]) == 0
        chat = tmp_path / "chat.json"
        argv = ["bench", "serve", *common, "--endpoint", "chat", "--num-prompts", "3"]
        argv += ["--input-len", "8", "--output-len", "5", "--arrival", "concurrency:2"]
        assert cli_main([*argv, "--result-json", str(chat)]) == 0
    report = capsys.readouterr().out
    assert "TTFT mean/med/p95/p99" in report and "client CPU" in report
    result = json.loads(out.read_text())
    s = result["summary"]
    assert (s["completed"], s["failed"], s["missing_usage"]) == (6, 0, 0)
    max_tokens = [r.max_tokens for r in _workload(result)]
    # ignore_eos: usage reports exactly max_tokens for every request
    assert [r["completion_tokens"] for r in result["requests"]] == max_tokens
    assert s["total_output_tokens"] == sum(max_tokens)
    assert s["goodput"]["fraction"] == 1.0
    assert all(r["ttft_s"] <= r["e2e_s"] for r in result["requests"])
    c = json.loads(chat.read_text())["summary"]
    assert (c["completed"], c["total_output_tokens"]) == (3, 15)


def _workload(result):

    cfg = result["config"]
    spec = WorkloadSpec(
        cfg["workload"]["num_requests"],
        parse_length("mixed:8:64:0.3"),
        parse_length("uniform:4:12"),
        seed=cfg["workload"]["seed"],
    )
    return build_workload(spec, TokenizerPrompts(BUILTIN_TARGET), parse_arrival(cfg["arrival"]))
