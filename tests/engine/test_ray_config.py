"""The tensor-parallel fields of EngineConfig: defaults, validation, and the CLI's
one-line refusal (no Ray is started here)."""

from __future__ import annotations

import pytest

from tandem.engine.config import EngineConfig
from tandem.server.cli import main


def test_the_executor_backend_follows_the_tensor_parallel_size():
    assert EngineConfig().executor_backend == "uni"
    assert EngineConfig(tensor_parallel_size=2).executor_backend == "ray"
    ray_tp1 = EngineConfig(distributed_executor_backend="ray")
    assert ray_tp1.executor_backend == "ray" and ray_tp1.tensor_parallel_size == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
        ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, "needs ray"),
        ({"distributed_executor_backend": "mp"}, "must be one of ray, uni"),
        ({"ray_address": " "}, "ray_address must be auto or HOST:PORT"),
        ({"step_timeout_s": 0}, "step_timeout_s must be > 0"),
    ],
)
def test_bad_parallel_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**fields)


def test_the_cli_refuses_uni_with_tp2_in_one_line(capsys):
    argv = ["serve", "--tensor-parallel-size", "2", "--distributed-executor-backend", "uni"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs ray" in err
