"""`tandem serve` flags: generated from the config dataclasses, vLLM aliases, one-line
errors with exit status 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tandem.engine.config import EngineConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.server.cli import main, make_parser, parse_configs
from tandem.server.config import ServerConfig
from tandem.server.flags import ConfigError, flag_name


def serve_help() -> str:
    sub = make_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return " ".join(sub.format_help().split())


def test_help_lists_every_field_with_its_meaning():
    text = serve_help()
    for cls in (ServerConfig, EngineConfig, SchedulerConfig):
        for f in dataclasses.fields(cls):
            assert flag_name(f.name) in text, f.name
            words = " ".join(f.metadata["help"].split()[:3])
            assert words in text, f.name
    assert "--no-enable-prefix-caching" in text and "--kv-cache-memory-bytes" in text
    assert "(default: 8000)" in text and "(default: 256)" in text


def test_flags_reach_the_configs():
    server, engine, sched = parse_configs(
        [
            "/models/x",
            "--port",
            "9000",
            "--kv-cache-memory-bytes",
            "4GiB",
            "--no-enable-prefix-caching",
            "--max-num-seqs",
            "8",
            "--allowed-origins",
            "http://a,http://b",
            "--shutdown-timeout",
            "2.5",
        ],
        environ={},
    )
    assert server.port == 9000 and server.shutdown_timeout == 2.5
    assert server.allowed_origins == ("http://a", "http://b")
    assert engine.model == "/models/x" and engine.kv_cache_bytes == 4 << 30
    assert sched.max_num_seqs == 8 and sched.enable_prefix_caching is False
    defaults = parse_configs([], environ={})
    assert defaults == (ServerConfig(), EngineConfig(), SchedulerConfig())


def test_api_key_from_environment_unless_given():
    assert parse_configs([], environ={"TANDEM_API_KEY": "k1"})[0].api_key == "k1"
    given = parse_configs(["--api-key", "k2"], environ={"TANDEM_API_KEY": "k1"})
    assert given[0].api_key == "k2"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--block-size", "0"], "--block-size"),
        (["--kv-cache-memory", "4XB"], "--kv-cache-memory"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--dtype", "int3"], "--dtype"),
        (["--log-level", "loud"], "--log-level"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    ],
)
def test_bad_value_exits_2_with_one_line_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        code = main(["serve", *argv])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_parse_configs_raises_config_error():
    with pytest.raises(ConfigError) as exc:
        parse_configs(["--max-queued-requests", "0"], environ={})
    assert exc.value.flag == "--max-queued-requests"


def test_console_script_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "tandem.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--served-model-name" in out.stdout


def test_serving_leaves_a_core_to_the_event_loop():
    from tandem.server.cli import serving_threads

    assert serving_threads(EngineConfig(), 8).num_threads == 7
    assert serving_threads(EngineConfig(), 1).num_threads == 1
    assert serving_threads(EngineConfig(num_threads=3), 8).num_threads == 3
