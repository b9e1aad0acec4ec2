"""Structured output's cost: decode throughput of a batch in which half the requests follow a JSON
schema (grammar bitmask filled on the host while the forward pass runs, applied in the sampler) vs
the same batch all unconstrained, same random-weight checkpoint (bench/shapes.py; default the
Llama-3.2-1B shape in bf16), same process, interleaved repeats.

Workload: --batch requests (default 32) of --prompt-len random token ids, --max-tokens new tokens each
(greedy). Constrained requests follow SCHEMA, whose array needs more items than fit in max_tokens, so
no request finishes early and both modes decode at the full batch for the same number of tokens.
Unconstrained requests use ignore_eos. The bench checkpoint's word-level tokenizer cannot spell JSON,
so the checkpoint gets a byte-level BPE tokenizer (tiny_model's, trained on its built-in text) over
its first ids; the rest of the 128k vocabulary is never allowed by the grammar. The bitmask is as
wide as the real vocabulary (its upload and application cost what they would), but xgrammar's mask
fill, which grows with the tokenizer's size, is cheaper than with a real 128k tokenizer: pass
--tokenizer DIR (a Hugging Face tokenizer directory, e.g. Llama 3's) to measure with that instead.

    python3 bench/bench_structured_output.py --out $OUT/structured.json                # GPU
    .venv/bin/python bench/bench_structured_output.py --device cpu --out /tmp/so.json   # CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_offline import device_name, fmt_range, git_commit, sync  # noqa: E402
from shapes import FIRST_TOKEN_ID, get_shape, make_random_checkpoint  # noqa: E402

from infergrid.worker.llm import LLM  # noqa: E402
from infergrid.worker.sampling_params import SamplingParams  # noqa: E402
from infergrid.worker.structured_output.params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                       "name": {"type": "string", "maxLength": 6},
                       "state": {"enum": ["on", "off"]}},
        "required": ["id", "name", "state"], "additionalProperties": False}}},
    "required": ["records"],
    "additionalProperties": False,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model")


def with_tokenizer(checkpoint: str, tokenizer_dir: str | None) -> str:
    """A directory with the checkpoint's weights and config (linked) and a tokenizer that can spell JSON."""
    out = tempfile.mkdtemp(prefix="bench-structured-")
    for name in os.listdir(checkpoint):
        if name not in _TOKENIZER_FILES:
            os.symlink(os.path.join(checkpoint, name), os.path.join(out, name))
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), out)
    else:
        from infergrid.worker.tiny_model import _write_tokenizer, train_tokenizer

        _write_tokenizer(out, train_tokenizer(1024))
    return out


class CallTimes:
    """Host seconds inside the runner's `forward` and `sampler` calls (wrapped). On a GPU both only
    launch work, so a call that takes long is waiting for the device (a hidden synchronization); on a
    CPU they include the compute."""

    def __init__(self, runner: Any) -> None:
        self.seconds = {"forward": 0.0, "sampler": 0.0}
        for name in self.seconds:
            setattr(runner, name, self._timed(name, getattr(runner, name)))

    def _timed(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return call

    def take(self) -> dict[str, float]:
        """The seconds since the last call, by wrapped call; resets them."""
        taken, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return taken


def profile_modes(llm: LLM, prompts: list[list[int]], modes: dict[str, list[SamplingParams]], tokens: int,
                  out_dir: str) -> dict[str, dict[str, float]]:
    """Each mode's batch for `tokens` new tokens under torch.profiler: profile_<mode>.txt (ops by self
    device time, else CPU time) and trace_<mode>.json in out_dir. Returns per mode the wall and device-busy
    ms per step (busy from the trace: kernels, copies, memsets; device only)."""
    from bench_tensor_parallel import gpu_busy_ms
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    os.makedirs(out_dir, exist_ok=True)
    engine, found = llm.llm_engine, {}
    for mode, params in modes.items():
        short = [dataclasses.replace(p, max_tokens=tokens) for p in params]
        steps = engine.num_steps_total
        with profile(activities=activities) as prof:
            wall, _ = run(llm, prompts, short)
        num_steps = engine.num_steps_total - steps
        tag = mode.replace(" ", "_")
        with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w", encoding="utf-8") as f:
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=40, max_name_column_width=70))
        trace = os.path.join(out_dir, f"trace_{tag}.json")
        prof.export_chrome_trace(trace)
        found[mode] = {"steps": num_steps, "wall_ms_per_step": 1e3 * wall / num_steps,
                       "device_busy_ms_per_step": gpu_busy_ms(trace) / num_steps if cuda else 0.0}
        print(f"profiled {mode}: {num_steps} steps, {found[mode]['wall_ms_per_step']:.3f} ms/step wall under the "
              f"profiler, device busy {found[mode]['device_busy_ms_per_step']:.3f} ms/step; {trace}")
    return found


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, int]:
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync()
    wall = time.perf_counter() - start
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--shape", default=None, help="default: 1b on CUDA, tiny on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory to use instead of the built-in BPE")
    p.add_argument("--batch", type=int, default=None, help="requests per batch (default 32 on CUDA, 8 on CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    p.add_argument("--max-tokens", type=int, default=None, help="default 256 on CUDA, 24 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 5 on CUDA, 2 on CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("bench", "results", "structured_output.json"))
    p.add_argument("--profile-dir", default=None,
                   help="also profile --profile-tokens steps of each mode (torch.profiler): a table and a Chrome "
                        "trace each, and the device's busy ms per step beside the wall ms")
    p.add_argument("--profile-tokens", type=int, default=32)
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    for name, gpu, cpu in (("shape", "1b", "tiny"), ("dtype", "bfloat16", "float32"), ("batch", 32, 8),
                           ("prompt_len", 128, 16), ("max_tokens", 256, 24), ("repeats", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv])
    shape = get_shape(args.shape)
    checkpoint = with_tokenizer(make_random_checkpoint(args.shape, dtype=args.dtype, device=args.device),
                                args.tokenizer)
    try:
        llm = LLM(checkpoint, dtype=args.dtype, device=args.device, max_num_seqs=max(args.batch, 1),
                  max_model_len=args.prompt_len + args.max_tokens + 16,
                  gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False)
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(FIRST_TOKEN_ID, shape.vocab_size) for _ in range(args.prompt_len)]
                   for _ in range(args.batch)]
        free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                     structured_outputs=StructuredOutputsParams(json=SCHEMA))
        _, compile_s = llm.llm_engine.grammar_compiler.compile(constrained.structured_outputs)  # type: ignore[arg-type]
        modes = {
            "unconstrained": [free] * args.batch,
            "half constrained": [constrained if i % 2 else free for i in range(args.batch)],
        }
        run(llm, prompts[:2], [free, constrained])  # warm-up (kernels, matcher)
        results: dict[str, dict[str, list[float]]] = {
            m: {"tok_s": [], "wall_s": [], "tokens": [], "fill_ms_per_step": [], "steps": [], "forward_ms_per_step": [],
                "sampler_ms_per_step": [], "other_host_ms_per_step": []} for m in modes}
        manager, engine = llm.llm_engine.structured_output, llm.llm_engine
        calls = CallTimes(engine.model_runner)
        for _ in range(args.repeats):
            for mode, params in modes.items():
                fills, fill_s, steps = manager.num_fills_total, manager.fill_seconds_total, engine.num_steps_total
                calls.take()
                wall, tokens = run(llm, prompts, params)
                inside, num_steps = calls.take(), engine.num_steps_total - steps
                for name, seconds in (*inside.items(), ("other_host", wall - sum(inside.values()))):
                    results[mode][f"{name}_ms_per_step"].append(1e3 * seconds / num_steps)
                results[mode]["tok_s"].append(tokens / wall)
                results[mode]["wall_s"].append(wall)
                results[mode]["tokens"].append(tokens)
                results[mode]["steps"].append(engine.num_steps_total - steps)
                num_fills = manager.num_fills_total - fills
                results[mode]["fill_ms_per_step"].append(
                    1e3 * (manager.fill_seconds_total - fill_s) / num_fills if num_fills else 0.0)
        expected = args.batch * args.max_tokens
        complete = all(t == expected for r in results.values() for t in r["tokens"])
        profiled = profile_modes(llm, prompts, modes, args.profile_tokens, args.profile_dir) if args.profile_dir else {}
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)

    base = statistics.median(results["unconstrained"]["tok_s"])
    half = statistics.median(results["half constrained"]["tok_s"])
    dev = device_name()
    print(f"\nstructured output: {args.shape}, {args.dtype}, {dev}; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.max_tokens} new tokens; {args.repeats} interleaved repeats, median [min-max]; "
          f"schema compiled in {compile_s or 0.0:.3f} s")
    print("| mode | tok/s | vs unconstrained | host bitmask fill ms/step (overlaps the forward pass) "
          "| host ms/step in forward calls | in sampler calls | elsewhere |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {fmt_range(r['tok_s'])} | {statistics.median(r['tok_s']) / base:.3f}x "
              f"| {fmt_range(r['fill_ms_per_step'], '.3f')} | {fmt_range(r['forward_ms_per_step'], '.3f')} "
              f"| {fmt_range(r['sampler_ms_per_step'], '.3f')} | {fmt_range(r['other_host_ms_per_step'], '.3f')} |")
    if not complete:
        print("WARNING: some requests ended before max_tokens: the modes did not decode the same tokens")
    import transformers

    report: dict[str, Any] = {
        "bench": "structured_output", "device": dev, "commit": git_commit(), "command": command,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "shape": args.shape, "args": vars(args), "schema": SCHEMA,
        "tokenizer": args.tokenizer or "tiny_model byte-level BPE (1024)", "grammar_compile_s": compile_s,
        "results": {m: {**r, "tok_s_median": statistics.median(r["tok_s"])} for m, r in results.items()},
        "half_constrained_vs_unconstrained": half / base, "all_requests_ran_to_max_tokens": complete,
        "profiled": profiled,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
