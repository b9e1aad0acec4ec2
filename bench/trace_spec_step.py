"""Torch-profiler trace of one bench_spec_decode mode at batch 1: where a speculating step's time goes
on the GPU and on the host (kernel table, graph-launch costs; the Chrome trace for a timeline).

    PYTHONPATH=worker/src python bench/trace_spec_step.py --mode copy:draft --out-dir $OUT

Writes OUT_DIR/trace.json.gz and prints the profiler's op table.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_spec_decode as sd  # noqa: E402
from shapes import make_random_checkpoint  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="copy:draft", choices=sd.MODES)
    p.add_argument("--shape", default="1b")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated under the profiler")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args()
    sargs = sd.parse_args(["--shape", args.shape, "--batch-sizes", "1", "--modes", args.mode])
    std = dict(layer_init_std=sd.COPY_LAYER_STD, tie_word_embeddings=True) if args.mode.startswith("copy:") else {}
    model = make_random_checkpoint(args.shape, dtype=sargs.dtype, seed=0, **std)
    draft = make_random_checkpoint(args.shape, dtype=sargs.dtype, seed=1, **sd.draft_shape(sargs),
                                   **(std or dict(tie_word_embeddings=False)))
    engine = sd.make_engine(sargs, model, draft, args.mode, eager=False)
    prompts = sd.make_prompts(1, sargs.prompt_len, sargs.phrase_len, engine.model_config.vocab_size, 0)
    for rep in range(3):  # warm: kernels compiled, adaptive k settled
        sd.run_batch(engine, prompts, sargs.max_tokens, f"w{rep}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, wall = sd.run_batch(engine, prompts, args.tokens, "traced")
    print(f"{args.mode}: {args.tokens} tokens in {wall * 1e3:.1f} ms under the profiler")
    path = os.path.join(args.out_dir, "trace.json")
    prof.export_chrome_trace(path)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
        g.write(f.read())
    os.remove(path)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
