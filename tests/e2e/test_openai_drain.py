"""SIGTERM: /health and new requests get 503, in-flight requests finish (or are
aborted at --shutdown-timeout), and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

PROMPT = {"model": MODEL_NAME, "prompt": "ROMEO:", "ignore_eos": True}


def _wait_running(server: TandemServer, n: int) -> None:
    deadline = time.monotonic() + 30
    while server.metric("tandem:num_requests_running") < n:
        assert time.monotonic() < deadline, "requests did not start"
        time.sleep(0.02)


def _stream_lines(server: TandemServer, body: dict, out: list[str]) -> None:
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r,
    ):
        out.extend(line for line in r.iter_lines() if line)


def test_sigterm_drains_in_flight_requests_then_exits_0():
    require_builtin_model()
    server = TandemServer(["--shutdown-timeout", "60"]).start()
    try:
        results: dict[str, object] = {}
        plain = threading.Thread(
            target=lambda: results.update(
                plain=httpx.post(
                    server.base_url + "/v1/completions",
                    json=PROMPT | {"max_tokens": 150},
                    timeout=60,
                )
            )
        )
        lines: list[str] = []
        streamed = threading.Thread(
            target=_stream_lines, args=(server, PROMPT | {"max_tokens": 150}, lines)
        )
        plain.start()
        streamed.start()
        _wait_running(server, 2)
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 503
        new = httpx.post(
            server.base_url + "/v1/completions", json=PROMPT | {"max_tokens": 1}, timeout=5
        )
        assert new.status_code == 503 and new.json()["error"]["type"]
        plain.join(60)
        streamed.join(60)
        r = results["plain"]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 150
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:]) for x in lines[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_shutdown_timeout_aborts_what_is_left_and_exits_0():
    require_builtin_model()
    server = TandemServer(["--shutdown-timeout", "1"]).start()
    try:
        results: dict[str, object] = {}
        body = PROMPT | {"max_tokens": 1000}
        t = threading.Thread(
            target=lambda: results.update(
                r=httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
            )
        )
        t.start()
        _wait_running(server, 1)
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        t.join(30)
        assert results["r"].status_code == 503
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        server.stop()


def test_a_model_that_fails_to_load_exits_1(tmp_path):
    server = TandemServer([str(tmp_path / "no-such-model")]).start(wait=False)
    try:
        assert server.proc.wait(60) == 1
        assert "no-such-model" in server.log()
    finally:
        server.stop()
