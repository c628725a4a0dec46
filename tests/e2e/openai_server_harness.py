"""A real `tandem serve` in a subprocess (its own process group) for end-to-end tests.

    with TandemServer(["--max-num-seqs", "4"]) as srv:
        client = srv.openai()
        ...

Stopped in teardown by its process group id (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

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
            self.wait_ready()
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

    def metric(self, name: str) -> float:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL after 30 s; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()
        Path(self.log_path).unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> TandemServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _flag_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None
