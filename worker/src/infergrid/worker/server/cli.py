"""`infergrid-worker serve --model PATH [server args] [engine args with vLLM's names]`.

`add_serve_args(parser)` + `run(args)` are what `infergrid.worker.cli` dispatches to; `main(argv)`
runs the command on its own (`python -m infergrid.worker.server.cli --model ...`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

API_KEY_ENV = "INFERGRID_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `serve` options to `parser`."""
    srv = parser.add_argument_group("server")
    srv.add_argument("--model", required=True, help="Hugging Face model directory or a .gguf file (or a directory "
                     "holding one), local, file:// or hf://")
    srv.add_argument("--model-cache-dir", default=None,
                     help="where .gguf sources are converted (default: $INFERGRID_CACHE/models or "
                          "~/.cache/infergrid/models)")
    srv.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    srv.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    srv.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' (default: env {API_KEY_ENV}; none = open)")
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="name(s) clients send as 'model' (default: the --model path); the first is reported")
    srv.add_argument("--max-queue-size", type=int, default=256,
                     help="most engine sequences in flight (waiting + running; a request weighs prompts x n); "
                          "beyond it 429 + Retry-After")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds SIGTERM waits for in-flight requests before exiting")
    srv.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                     help="larger request bodies get 413")
    srv.add_argument("--stall-timeout", type=float, default=30.0,
                     help="seconds without an engine step while requests wait before /health fails")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    srv.add_argument("--disable-uvicorn-access-log", action="store_true", help="no per-request access log")

    eng = parser.add_argument_group("engine (vLLM names)")
    eng.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    eng.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of GPU memory to use")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per step")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per step")
    eng.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse KV blocks of shared prompt prefixes (default on)")
    eng.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="schedule the next step while the GPU runs this one (default on; with "
                          "speculative decoding only while no request speculates)")
    eng.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over")
    eng.add_argument("--speculative-method", choices=["ngram", "draft"], default=None, help="speculative decoding")
    eng.add_argument("--num-speculative-tokens", type=int, default=0, help="draft tokens per step")
    eng.add_argument("--draft-model", default=None, help="draft model directory (--speculative-method draft)")
    eng.add_argument("--draft-lm-head-dtype", choices=["fp8"], default=None,
                     help="the draft model's LM head in FP8 (half its bytes per pass; the target verifies)")
    eng.add_argument("--speculative-disable-by-batch-size", type=int, default=None, metavar="N",
                     help="propose no drafts in a step in which more than N requests sample (default 32; "
                          "N >= --max-num-seqs: never)")
    eng.add_argument("--num-gpu-blocks-override", type=int, default=None, help="force the KV pool size (tests)")
    eng.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    eng.add_argument("--seed", type=int, default=0, help="engine seed")
    return parser


def engine_config_from_args(args: argparse.Namespace) -> Any:
    """EngineConfig from parsed args (raises ValueError naming the bad field)."""
    from infergrid.worker.config import DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE, EngineConfig

    disable_by_batch_size = args.speculative_disable_by_batch_size
    return EngineConfig(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching, async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size,
        speculative_method=args.speculative_method, num_speculative_tokens=args.num_speculative_tokens,
        draft_model=args.draft_model, draft_lm_head_dtype=args.draft_lm_head_dtype,
        speculative_disable_by_batch_size=DEFAULT_SPECULATIVE_DISABLE_BY_BATCH_SIZE if disable_by_batch_size is None
        else disable_by_batch_size,
        device=args.device, seed=args.seed,
        num_gpu_blocks_override=args.num_gpu_blocks_override, model_cache_dir=args.model_cache_dir,
    )


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServerSettings from parsed args (API key from the flag or INFERGRID_API_KEY)."""
    from .api_server import ServerSettings

    return ServerSettings(
        model_path=args.model,
        served_model_names=tuple(args.served_model_name or [args.model]),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_queue_size=args.max_queue_size, drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_request_body_bytes, stall_timeout_s=args.stall_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (drained) -> 0; bad arguments -> 2; model load failure -> 1."""
    import uvicorn

    from .api_server import build_app
    from .lifecycle import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    try:
        engine_config = engine_config_from_args(args)
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"infergrid-worker serve: error: {exc}", file=sys.stderr)
        return 2

    def make_engine() -> Any:
        from infergrid.worker import AsyncLLM

        return AsyncLLM(engine_config)

    app = build_app(settings, make_engine)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=2,
                            timeout_keep_alive=5)
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s)
    server.run()
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` as the serve command's options and run it."""
    parser = argparse.ArgumentParser(prog="infergrid-worker serve", description="Run the worker's HTTP server.")
    add_serve_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
