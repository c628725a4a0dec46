"""`tandem serve [MODEL] [flags]`: the one composition root of the HTTP server.

Flags come from the fields of ServerConfig, EngineConfig and SchedulerConfig (names
follow `vllm serve`; vLLM's own spellings are accepted as aliases). A bad flag value
exits with status 2 and one line naming the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import uvicorn

from tandem.engine.config import EngineConfig
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.server.config import ServerConfig
from tandem.server.flags import ConfigError, add_config_flags, build_config

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tandem.server.app import ServingEngine

ENV_API_KEY = "TANDEM_API_KEY"
# vLLM's spellings, accepted too, so `vllm serve` command lines carry over.
ALIASES: dict[str, list[str]] = {
    "kv_cache_memory": ["--kv-cache-memory-bytes"],
    "log_level": ["--uvicorn-log-level"],
    "prompt_lookup_min": ["--ngram-prompt-lookup-min"],
    "prompt_lookup_max": ["--ngram-prompt-lookup-max"],
}
# Seconds uvicorn waits for connections after the drain (responses then finish fast:
# the engine is stopped, so what still runs ends aborted).
CLOSE_GRACE_S = 5.0


class _Parser(argparse.ArgumentParser):
    """Errors as one line (`tandem serve: error: argument --port: ...`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tandem", description="Tandem: an OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI HTTP API",
        epilog="Unlike the offline API, `tandem serve` defaults --num-threads to the CPU "
        "cores minus one: the last core is left to the HTTP event loop.",
    )
    serve.add_argument(
        "model_arg",
        nargs="?",
        metavar="MODEL",
        default=None,
        help="local Hugging Face directory or hub id (default: the built-in model)",
    )
    bench = sub.add_parser("bench", help="benchmarks: `tandem bench serve --help`")
    bench.add_argument("bench_command", choices=["serve"], help="load-test a running server")
    add_config_flags(serve, ServerConfig, ALIASES)
    add_config_flags(serve, EngineConfig, ALIASES)
    add_config_flags(serve, SchedulerConfig, ALIASES)
    add_config_flags(serve, SpeculativeConfig, ALIASES)
    serve.add_argument(
        "--speculative-config",
        dest="speculative_config",
        metavar="JSON",
        default=None,
        help='vLLM\'s form: \'{"method": "draft_model"|"ngram", "model": DIR, '
        '"num_speculative_tokens": K}\'; the flags above override its keys',
    )
    return parser


def parse_configs(
    argv: Sequence[str], environ: dict[str, str] | None = None
) -> tuple[ServerConfig, EngineConfig, SchedulerConfig]:
    """The three configs from `serve` arguments. Raises ConfigError naming a flag."""
    parser = make_parser()
    args = parser.parse_args(["serve", *argv])
    env = os.environ if environ is None else environ
    extra: dict[str, object] = {}
    if args.model_arg is not None:
        if getattr(args, "model", None) not in (None, args.model_arg):
            raise ConfigError("--model", "MODEL and --model disagree")
        extra["model"] = args.model_arg
    if getattr(args, "api_key", None) is None and env.get(ENV_API_KEY):
        extra["api_key"] = env[ENV_API_KEY]
    server = build_config(ServerConfig, args, extra)
    engine = build_config(EngineConfig, args, extra)
    scheduler = build_config(SchedulerConfig, args, extra)
    return server, engine, scheduler


def parse_speculative_config(argv: Sequence[str]) -> SpeculativeConfig:
    """The speculative decoding config from `serve` arguments: its flags, over vLLM's
    --speculative-config JSON when given. Raises ConfigError naming a flag."""
    args = make_parser().parse_args(["serve", *argv])
    if args.speculative_config is None:
        return build_config(SpeculativeConfig, args)
    names = [f.name for f in dataclasses.fields(SpeculativeConfig)]
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    try:
        return SpeculativeConfig.from_vllm_json(args.speculative_config, **given)
    except (ValueError, TypeError) as exc:
        raise ConfigError("--speculative-config", str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if argv[:2] == ["bench", "serve"]:
        from tandem.server.bench import main as bench_serve

        return bench_serve(argv[2:])
    if not argv or argv[0] != "serve":
        parser.parse_args(argv)  # prints help or the error, exits
        return 2
    try:
        server_cfg, engine_cfg, sched_cfg = parse_configs(argv[1:])
        spec_cfg = parse_speculative_config(argv[1:])
        if spec_cfg.uses_draft_model and spec_cfg.speculative_model is None and engine_cfg.model:
            raise ConfigError(
                "--speculative-model",
                "the draft method needs a draft model directory for a model other than the "
                "built-in one (the built-in draft pairs only with the built-in target)",
            )
    except ConfigError as exc:
        print(f"tandem serve: error: {exc}", file=sys.stderr)
        return 2
    # Before torch loads: idle OpenMP workers sleep instead of spinning on the cores
    # the event loop needs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    engine_cfg = serving_threads(engine_cfg, os.cpu_count() or 1)
    return serve(server_cfg, engine_cfg, sched_cfg, spec_cfg)


def serving_threads(engine_cfg: EngineConfig, num_cpus: int) -> EngineConfig:
    """Torch threads for serving, when not given: all cores but one, which the HTTP
    event loop needs (torch threads spinning on it stall streaming)."""
    if engine_cfg.num_threads is not None:
        return engine_cfg
    return dataclasses.replace(engine_cfg, num_threads=max(1, num_cpus - 1))


def serve(
    server_cfg: ServerConfig,
    engine_cfg: EngineConfig,
    sched_cfg: SchedulerConfig,
    spec_cfg: SpeculativeConfig | None = None,
) -> int:
    """Run the HTTP server until SIGTERM/SIGINT; 0 after a clean drain, 1 when the
    engine failed to start or died while serving."""
    from tandem.server.app import build_app
    from tandem.server.build import default_model_name
    from tandem.server.logs import configure_logging

    configure_logging(server_cfg.log_level, server_cfg.log_format)
    server: DrainingServer | None = None
    failed = False

    def on_fatal() -> None:  # the engine failed to start, or died while serving
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    model_name = server_cfg.served_model_name or default_model_name(engine_cfg)
    starter = _engine_starter(server_cfg, engine_cfg, sched_cfg, spec_cfg)
    app = build_app(server_cfg, starter, model_name, on_fatal)
    config = uvicorn.Config(
        app,
        host=server_cfg.host,
        port=server_cfg.port,
        log_level=server_cfg.log_level,
        timeout_graceful_shutdown=int(CLOSE_GRACE_S),
        access_log=server_cfg.log_level in ("debug", "trace"),
        # json: no uvicorn handlers, so its records reach the root JSON handler
        **({"log_config": None} if server_cfg.log_format == "json" else {}),
    )
    server = DrainingServer(config, lambda: _drain(app, server_cfg.shutdown_timeout))
    server.run()
    return 1 if failed else 0


def _engine_starter(
    server_cfg: ServerConfig,
    engine_cfg: EngineConfig,
    sched_cfg: SchedulerConfig,
    spec_cfg: SpeculativeConfig | None = None,
) -> Callable[[], ServingEngine]:
    def start() -> ServingEngine:  # runs in a worker thread: loads the model
        from tandem.scheduler.loop import EngineLoop
        from tandem.server.app import ServingEngine
        from tandem.server.build import build_engine, freeze_heap, launch_engine_process
        from tandem.server.logs import configure_logging
        from tandem.server.metrics_engine import STEP_HISTORY

        template = server_cfg.chat_template
        if server_cfg.engine_process:
            log_setup = functools.partial(
                configure_logging, server_cfg.log_level, server_cfg.log_format
            )
            engine = launch_engine_process(
                engine_cfg, sched_cfg, template, STEP_HISTORY, spec_cfg, log_setup=log_setup
            )
            serving = ServingEngine(engine.loop, engine.tokenizer, engine.kv.max_model_len)
        else:
            built = build_engine(engine_cfg, sched_cfg, template, STEP_HISTORY, spec_cfg)
            serving = ServingEngine(EngineLoop(built.core), built.tokenizer, built.kv.max_model_len)
        freeze_heap()  # a full collection here would stall every stream (and, in-process,
        # every step) for as long as it walks the start-up heap
        return serving

    return start


async def _drain(app: FastAPI, timeout: float) -> None:
    from tandem.server.app import drain, stop_engine

    if not await drain(app, timeout):
        # Out of time: stop the engine so what still runs ends (aborted) now.
        await asyncio.to_thread(stop_engine, app.state.deps, CLOSE_GRACE_S)


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, but SIGTERM first drains: /health and new requests get 503,
    in-flight requests finish (up to the shutdown timeout), then the process exits 0.
    A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_requested = False
        self.drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn re-raises those on exit, and a
        # re-raised SIGTERM would end the process with status -15 instead of 0.
        if self.drain_requested:
            self.force_exit = sig == signal.SIGINT
            self.should_exit = True
        else:
            self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain()
        finally:
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
