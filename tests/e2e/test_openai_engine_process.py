"""The engine core in its own process (the default) behind a real server: a killed
engine fails in-flight requests and turns /health 503; stopping the server leaves no
process behind; --no-engine-process serves from a thread instead."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

LONG = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True}


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each child process of pid."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            out[int(child)] = cmd.decode(errors="replace")
    return out


def engine_pid(server: TandemServer) -> int:
    assert server.proc is not None
    found = [p for p, cmd in children(server.proc.pid).items() if "spawn_main" in cmd]
    assert len(found) == 1, children(server.proc.pid)
    return found[0]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_engine_fails_in_flight_requests_then_health_is_503():
    require_builtin_model()
    server = TandemServer().start()
    try:
        assert server.proc is not None
        helpers = children(server.proc.pid)  # the engine and multiprocessing's tracker
        engine = engine_pid(server)
        with (
            httpx.Client(base_url=server.base_url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as r,
        ):
            lines = (line for line in r.iter_lines() if line)
            for _ in range(3):
                assert next(lines).startswith("data: ")
            os.kill(engine, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert error["type"] == "internal_server_error"
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        r = httpx.post(server.base_url + "/v1/completions", json=LONG, timeout=10)
        assert r.status_code == 503
        assert "exited (killed by signal 9)" in server.log()
        server.stop()
        for pid in helpers:
            deadline = time.monotonic() + 10
            while running(pid):
                assert time.monotonic() < deadline, f"{pid} outlived the server"
                time.sleep(0.05)
    finally:
        server.stop()


def test_sigterm_stops_the_engine_process_and_the_thread_loop_still_serves():
    require_builtin_model()
    with TandemServer() as server:
        engine = engine_pid(server)
        r = httpx.post(server.base_url + "/v1/completions", json=LONG | {"max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert server.stop() == 0
        assert not running(engine)
    with TandemServer(["--no-engine-process"]) as server:
        assert server.proc is not None and not children(server.proc.pid)
        r = httpx.post(server.base_url + "/v1/completions", json=LONG | {"max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
