"""Torch-profiler trace of bench_spec_decode modes at batch 1: where a step's time goes on the GPU
(busy vs idle per step, the kernel table) and on the host (the profiler's op table).

    PYTHONPATH=worker/src python bench/trace_spec_step.py --out-dir $OUT -- --modes agree:off agree:draft \
        --agreements 0.92 --draft-hidden 1024

Arguments after `--` are bench_spec_decode's (its modes, shapes and agreements). For each mode: warm
up, then trace --tokens tokens of one request; prints wall ms per step, GPU-busy ms per step (the
union of kernel and copy intervals: what the step would take if the GPU never waited for the host),
the GPU-idle share, and the kernels by total time. Writes OUT_DIR/trace_<mode>.json.gz.

Then, without the profiler (whose per-launch instrumentation inflates the host's share several
times), the host's time per step by phase: perf_counter around the engine's methods (inclusive;
`result` is the wait for the step's tokens). And where the device waits for the host: a CUDA event
at each phase's entry and exit, compared with the host's clock when it was recorded ("lag": how far
behind the host the device reached that point; ~0 means the device had run out of work there).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_spec_decode as sd  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_busy_us(events: list[dict]) -> float:
    """Union of the GPU intervals' lengths (us)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def analyze(path: str, steps: int, wall_ms: float, top: int) -> None:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        trace = json.load(f)
    gpu = [e for e in trace["traceEvents"] if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    busy_ms = gpu_busy_us(gpu) / 1e3
    print(f"  steps {steps}: wall {wall_ms / steps:.3f} ms/step, GPU busy {busy_ms / steps:.3f} ms/step, "
          f"GPU idle {1 - busy_ms / wall_ms:.0%}; {len(gpu) / steps:.0f} GPU ops/step")
    by_name: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in gpu:
        name = e["name"][:90]
        by_name[name] += e["dur"]
        count[name] += 1
    print("  | kernel | us/step | calls/step | us/call |")
    print("  |---|---|---|---|")
    for name, us in by_name.most_common(top):
        print(f"  | {name} | {us / steps:.1f} | {count[name] / steps:.1f} | {us / count[name]:.1f} |")


def _phases(engine: Any) -> list[tuple[str, Any, str]]:
    """(label, object, method name) of the host phases timed, in call order (nesting by indent)."""
    from infergrid.worker.runner import model_runner
    from infergrid.worker.runner.cuda_graph import GraphSet
    from infergrid.worker.runner.runner_output import PendingRunnerOutput

    runner, spec = engine.model_runner, engine.spec_decoder
    speculating = spec is not None
    phases = [("step", engine, "step"), (" schedule", engine.scheduler, "schedule"),
              (" execute_model", runner, "execute_model"), ("  sampling_metadata", runner.sampling, "build"),
              ("  prepare_inputs", runner, "prepare_inputs"), ("   upload", runner, "upload"),
              *([("   fill_drafts", spec, "fill_drafts")] if speculating else []),
              ("   batch_from_flat", model_runner, "batch_from_flat"), ("  forward (launch)", runner, "forward"),
              ("   graph replay", GraphSet, "replay"), ("  compute_logits", runner.model, "compute_logits"),
              *([("  verify", spec, "verify"), ("   rejection_sampler", spec.rejection_sampler, "forward"),
                 ("  propose_ahead", spec, "propose_ahead")] if speculating else []),
              (" result (wait + tokens to lists)", PendingRunnerOutput, "result"),
              (" update_from_output", engine.scheduler, "update_from_output"),
              *([(" propose (drafts)", spec, "propose")] if speculating else []),
              *([("  propose_drafts", spec.proposer, "propose_drafts")] if speculating else []),
              *([("   draft prepare_inputs", spec.proposer.runner, "prepare_inputs"),
                 ("   draft forward", spec.proposer.runner, "forward"),
                 ("   draft compute_logits", spec.proposer.runner.model, "compute_logits")]
                if speculating and hasattr(spec.proposer, "runner") else []),
              (" output_processor.process", engine.output_processor, "process"),
              (" update_draft_token_ids", engine.scheduler, "update_draft_token_ids")]
    return phases


@contextlib.contextmanager
def _wrapped_phases(engine: Any, wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]],
                    skip: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, every phase method of `_phases` (but the labels in `skip`) is `wrap(label, method)`."""
    restore: list[tuple[Any, str, Any, bool]] = []
    for label, obj, name in _phases(engine):
        if label.strip() in skip:
            continue
        restore.append((obj, name, vars(obj).get(name), name in vars(obj)))
        setattr(obj, name, wrap(label, getattr(obj, name)))  # (on a class: a function, bound as a method)
    try:
        yield
    finally:
        for obj, name, value, own in reversed(restore):
            if own:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def time_host_phases(engine: Any, prompt: list[list[int]], max_tokens: int) -> None:
    """Prints the host's mean time per step in each phase (see the module docstring)."""
    calls: collections.defaultdict[str, list[float]] = collections.defaultdict(list)

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                calls[label].append(time.perf_counter() - t)
        return wrapper

    steps_before = engine.num_steps_total
    with _wrapped_phases(engine, timed):
        _, wall = sd.run_batch(engine, prompt, max_tokens, "phases")
    steps = engine.num_steps_total - steps_before
    print(f"  host phases, no profiler: {steps} steps, {wall * 1e3 / steps:.3f} ms/step wall")
    for label, _, _ in _phases(engine):
        times = sorted(calls[label])
        spread = (f"  ({len(times)} calls, median {times[len(times) // 2] * 1e6:.0f} us, max {times[-1] * 1e6:.0f} us)"
                  if times and len(times) < steps // 2 else "")
        print(f"  {label:<36} {sum(times) * 1e6 / steps:8.1f} us/step{spread}")
    if engine.spec_decoder is not None:
        print(f"  speculative decoding: {engine.spec_decoder.describe()}")


def time_device_lag(engine: Any, prompt: list[list[int]], max_tokens: int) -> None:
    """Prints, per phase entry/exit, how far behind the host the device reached it (see the module
    docstring), and the device time from each such point to the next one recorded."""
    marks: list[tuple[str, float, Any]] = []

    def mark(label: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((label, time.perf_counter(), event))

    def marked(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            mark(label.strip() + " >")
            try:
                return fn(*a, **kw)
            finally:
                mark(label.strip() + " <")
        return wrapper

    torch.cuda.synchronize()
    mark("reference")
    with _wrapped_phases(engine, marked, skip=("step", "result (wait + tokens to lists)")):
        sd.run_batch(engine, prompt, max_tokens, "lag")
    torch.cuda.synchronize()
    _, host0, ref = marks[0]
    lags: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    spans: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    times = [(label, (host0 + ref.elapsed_time(ev) / 1e3), host) for label, host, ev in marks[1:]]
    for i, (label, gpu, host) in enumerate(times):
        lags[label].append((gpu - host) * 1e6)
        if i + 1 < len(times):
            spans[label + " -> " + times[i + 1][0]].append((times[i + 1][1] - gpu) * 1e6)
    print("  device lag behind the host at each point (us; ~0: the device waited for the host there)")
    print("  | point | count | median lag | share < 20 us |")
    print("  |---|---|---|---|")
    for label, values in lags.items():
        values.sort()
        print(f"  | {label} | {len(values)} | {values[len(values) // 2]:.0f} | "
              f"{sum(v < 20 for v in values) / len(values):.0%} |")
    print("  | device time between consecutive points | count | mean us |")
    print("  |---|---|---|")
    for pair, values in sorted(spans.items(), key=lambda kv: -sum(kv[1])):
        if sum(values) / max(1, len(values)) > 5:
            print(f"  | {pair} | {len(values)} | {sum(values) / len(values):.0f} |")


def main() -> int:
    argv = sys.argv[1:]
    bench_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="tokens generated under the profiler, per mode")
    p.add_argument("--top", type=int, default=25, help="kernels listed per mode")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    sargs = sd.parse_args([*bench_argv, "--batch-sizes", "1"])
    checkpoints, prompts = sd.build_checkpoints(sargs)
    os.makedirs(args.out_dir, exist_ok=True)
    for mode in sargs.modes:
        target, draft = checkpoints[sd.family(mode)]
        engine = sd.make_engine(sargs, target, draft, mode, eager=False)
        prompt = prompts[sd.family(mode)][:1]
        for rep in range(3):  # warm: kernels compiled
            sd.run_batch(engine, prompt, sargs.max_tokens, f"w{rep}")
        steps_before = engine.num_steps_total
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _, wall = sd.run_batch(engine, prompt, args.tokens, "traced")
        steps = engine.num_steps_total - steps_before
        path = os.path.join(args.out_dir, f"trace_{mode.replace(':', '_')}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(path)
        print(f"{mode}: {args.tokens} tokens in {wall * 1e3:.1f} ms under the profiler")
        analyze(path + ".gz", steps, wall * 1e3, args.top)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        time_host_phases(engine, prompt, sargs.max_tokens)
        if torch.cuda.is_available():
            time_device_lag(engine, prompt, sargs.max_tokens)
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
