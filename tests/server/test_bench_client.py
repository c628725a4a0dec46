"""The benchmark's HTTP/SSE client and a whole run against a scripted loopback server.

The server here is a test double of the wire format only (chunked SSE, errors, a
Content-Length body); the e2e test in tests/e2e/test_bench_serve.py runs real Tandem.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tandem.server.bench import BenchConfig, main, run_benchmark
from tandem.server.bench_client import SSEParser
from tandem.server.bench_workload import WorkloadSpec, parse_arrival, parse_length


def test_sse_parser_splits_events_across_feeds():
    p = SSEParser()
    assert p.feed(b'data: {"a": 1}\n\nda') == ['{"a": 1}']
    assert p.feed(b"ta: x\r\n") == []
    assert p.feed(b"data: y\r\n\r\n: comment\n\nevent: e\ndata:[DONE]\n\n") == ["x\ny", "[DONE]"]
    assert p.feed(b"") == []


def chunk(text, usage=None):
    choices = [] if usage else [{"index": 0, "text": text, "finish_reason": None}]
    body = {"choices": choices} | ({"usage": usage} if usage else {})
    return f"data: {json.dumps(body)}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    """POST /v1/completions: max_tokens 1 -> 429; prompt "mismatch" -> usage one more
    than the chunks; else one SSE chunk per token, sent as HTTP chunks split mid-event."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "scripted-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(req)
        if req["max_tokens"] == 1:
            body = json.dumps({"error": {"message": "server busy", "code": 429}}).encode()
            self.send_response(429)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        n = req["max_tokens"]
        extra = 1 if req["prompt"] == "mismatch" else 0
        usage = {"prompt_tokens": 3, "completion_tokens": n + extra}
        stream = b"".join(chunk(f" t{i}") for i in range(n)) + chunk("", usage)
        stream += b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(stream), 37):  # HTTP chunks that cut SSE events
            piece = stream[i : i + 37]
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_run_reads_chunked_sse_usage_and_errors(server, tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [
        {"prompt": "a", "output_len": 5},
        {"prompt": "busy", "output_len": 1},
        {"prompt": "mismatch", "output_len": 4},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines))
    spec = WorkloadSpec(6, parse_length("8"), parse_length("8"), dataset=str(data))
    cfg = BenchConfig(server, spec, parse_arrival("concurrency:2"), progress=False)
    result = run_benchmark(cfg)
    s = result["summary"]
    assert (s["completed"], s["failed"]) == (4, 2)
    assert s["errors_by_status"] == {"429": 2}
    assert s["first_errors"] == ["429: server busy"]
    assert s["total_output_tokens"] == 2 * 5 + 2 * 5  # usage: 4 + 1 extra for "mismatch"
    assert s["usage_chunk_mismatches"] == 2
    assert result["config"]["model"] == "scripted-model"  # from GET /v1/models
    reqs = result["requests"]
    assert [r["num_chunks"] for r in reqs if r["status"] == 200] == [5, 4, 5, 4]
    assert all(len(r["itl_s"]) == r["num_chunks"] - 1 for r in reqs if r["status"] == 200)
    body = Handler.seen[0]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    json.dumps(result)


def test_cli_writes_result_json_and_plot(server, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--base-url", server, "--num-prompts", "3", "--input-len", "4", "--output-len", "6"]
    assert main([*argv, "--arrival", "poisson:50", "--no-progress", "--result-json", str(out)]) == 0
    assert "output throughput" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["summary"]["total_output_tokens"] == 18
    assert result["config"]["request_rate"] == 50
    png = tmp_path / "lat.png"
    assert main(["--plot", str(png), str(out), str(out)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_is_one_line(capsys):
    assert main(["--arrival", "sometimes"]) == 2
    assert main(["--base-url", "http://127.0.0.1:9", "--no-progress", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("tandem bench serve: error:") for e in err)
