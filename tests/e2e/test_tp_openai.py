"""`tandem serve --tensor-parallel-size 2` on a Ray cluster the test starts (joined with
--ray-address), through the openai SDK: it serves; then one rank actor is killed with
ray.kill during generation: the in-flight requests fail with a 500 error (not a hang),
/health turns 503, and the server process exits non-zero, leaving no actor behind."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

FAIL_WITHIN_S = 30.0  # kill -> every in-flight request has its error
EXIT_WITHIN_S = 30.0  # kill -> the server process has exited


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tandem_actors(rank: int | None = None) -> list[tuple[str, str]]:
    """(name, namespace) of the live rank actors of Tandem servers on this cluster."""
    prefix = "tandem-rank" if rank is None else f"tandem-rank{rank}-"
    named = ray.util.list_named_actors(all_namespaces=True)
    return [(a["name"], a["namespace"]) for a in named if a["name"].startswith(prefix)]


def test_a_killed_rank_fails_requests_turns_health_503_and_exits_the_server(ray_address):
    require_builtin_model()
    args = ["--tensor-parallel-size", "2", "--ray-address", ray_address]
    with TandemServer(args + ["--step-timeout-s", "20", "--dtype", "float32"]) as server:
        assert server.proc is not None
        client = server.openai(max_retries=0, timeout=60)
        done = client.completions.create(
            model=MODEL_NAME, prompt="ROMEO:", max_tokens=8, temperature=0
        )
        assert done.usage is not None and done.usage.completion_tokens == 8

        errors: list[Exception] = []
        long = {"model": MODEL_NAME, "prompt": "JULIET:", "max_tokens": 1000}
        long["extra_body"] = {"ignore_eos": True}

        def blocking() -> None:
            try:
                client.completions.create(**long)
            except Exception as exc:
                errors.append(exc)

        waiter = threading.Thread(target=blocking)
        waiter.start()
        stream = iter(client.completions.create(stream=True, **long))
        for _ in range(3):
            assert next(stream).choices
        [(name, namespace)] = tandem_actors(rank=1)
        ray.kill(ray.get_actor(name, namespace=namespace))
        t0 = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        waiter.join(FAIL_WITHIN_S)
        assert not waiter.is_alive() and time.monotonic() - t0 < FAIL_WITHIN_S
        assert isinstance(errors[0], openai.InternalServerError), errors
        health = httpx.get(server.base_url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        assert server.proc.wait(EXIT_WITHIN_S - (time.monotonic() - t0)) == 1
        assert "tensor-parallel worker died" in server.log()
    deadline = time.monotonic() + 15
    while tandem_actors():  # the engine's actors go with it
        assert time.monotonic() < deadline, tandem_actors()
        time.sleep(0.2)
