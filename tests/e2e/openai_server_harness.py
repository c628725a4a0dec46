"""A real `tandem serve` in a subprocess (its own process group) for end-to-end tests.

    with TandemServer(["--max-num-seqs", "4"]) as srv:
        client = srv.openai()
        ...

Stopped in teardown by its process group id (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tandem.engine.builtin import BUILTIN_NAME, BUILTIN_TARGET

MODEL_NAME = BUILTIN_NAME
# Small KV cache and few threads: tests share 2 CPU cores with other work.
BASE_ARGS = ["--kv-cache-memory", "32MiB", "--num-threads", "1", "--log-level", "warning"]
START_TIMEOUT_S = 120.0


def require_builtin_model() -> None:
    if not (BUILTIN_TARGET / "model.safetensors").exists():
        pytest.skip(f"the built-in model is not trained yet ({BUILTIN_TARGET} is missing)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TandemServer:
    """`python -m tandem.server.cli serve` on a free port; waits for /health == 200."""

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.args = list(args or [])
        self.env = dict(os.environ) | (env or {})
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = _flag_value(self.args, "--api-key") or self.env.get("TANDEM_API_KEY")
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="tandem-serve-", suffix=".log")
        self._log = os.fdopen(fd, "wb")

    def start(self, wait: bool = True) -> TandemServer:
        cmd = [sys.executable, "-m", "tandem.server.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd + BASE_ARGS + self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group, stopped by its id
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop_all()  # never leave a half-started server behind
                raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-5000:]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(), timeout=60, **kwargs)

    def openai(self, **kwargs: object):
        import openai

        key = self.api_key or "unused"
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=key, **kwargs)

    def async_openai(self, **kwargs: object):
        import openai

        key = self.api_key or "unused"
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=key, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics: the first series of `name` whose labels include
        `labels` (e.g. `metric("tandem:request_success_total", finished_reason="abort")`)."""
        for sample_labels, value in self.samples(name):
            if labels.items() <= sample_labels.items():
                return value
        raise KeyError(name)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every series of `name` on /metrics: (labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        return [
            (sample.labels, float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no request runs or waits and no KV block is held by a request."""
        names = (
            "tandem:num_requests_running",
            "tandem:num_requests_waiting",
            "tandem:kv_cache_usage_perc",
        )
        deadline = time.monotonic() + timeout
        while True:
            values = {n: self.metric(n) for n in names}
            if not any(values.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not idle after {timeout}s: {values}")
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        """Resident memory of the server's process group (server + engine process)."""
        assert self.proc is not None
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if int(fields[2]) == self.proc.pid:  # field 5 of stat: the process group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss
        return total

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after 30 s; returns the exit status."""
        if self.proc is None:
            self._close_log()
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._close_log()
        return self.proc.returncode

    def stop_all(self) -> int | None:
        """`stop()`, then SIGKILL whatever the server left in its process group (an
        engine process it failed to stop). Tests that check the server's own cleanup
        call `stop()` first and look; teardown calls this so that nothing leaks."""
        rc = self.stop()
        if self.proc is not None:
            _killpg(self.proc.pid, signal.SIGKILL)
        return rc

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()
            Path(self.log_path).unlink(missing_ok=True)

    def __enter__(self) -> TandemServer:
        try:
            return self.start()
        except BaseException:
            self.stop_all()  # `__exit__` does not run when `__enter__` raises
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, sig)


def _flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None
