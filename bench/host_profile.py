"""Where a decode step's host time goes: one bench_spec_decode mode at one batch size, in a loop, for
`py-spy record` to sample (the GPU side is in bench_tensor_parallel's --profile-dir traces).

    py-spy record --format raw -o $OUT/copy_draft.txt -- python bench/host_profile.py --mode copy:draft
    python bench/host_profile.py --summarize $OUT/copy_draft.txt     # self time per function

Prints the mode's ms per step. Random-weight checkpoints as in bench_spec_decode.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def summarize(path: str, top: int = 40) -> None:
    """Self and inclusive sample shares per function, within LLMEngine.step, of a py-spy raw
    (collapsed stacks) file."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            if "LLMEngine.step" not in stack:  # the engine's steps only (not loading, not warm-up imports)
                continue
            # a frame is "function (path:line)": one entry per function and file
            frames = [fr.split(" (")[0] + " " + fr.split("/")[-1].rstrip(")").rsplit(":", 1)[0]
                      for fr in stack.split(";")]
            total += n
            self_counts[frames[-1]] += n
            for fr in set(frames):
                incl_counts[fr] += n
    print(f"{total} samples\n-- self --")
    for name, n in self_counts.most_common(top):
        print(f"{100 * n / total:6.1f}%  {name}")
    print("-- inclusive --")
    for name, n in incl_counts.most_common(top):
        print(f"{100 * n / total:6.1f}%  {name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="copy:draft")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--summarize", default=None, help="print a py-spy raw file's per-function shares and exit")
    p.add_argument("--shape", default="1b")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    import bench_spec_decode as sd
    from shapes import make_random_checkpoint

    sargs = sd.parse_args(["--shape", args.shape, "--batch-sizes", str(args.batch_size), "--modes", args.mode])
    copy = args.mode.startswith("copy:")
    std = dict(layer_init_std=sd.COPY_LAYER_STD, tie_word_embeddings=True) if copy else {}
    model = make_random_checkpoint(args.shape, dtype=sargs.dtype, seed=0, **std)
    draft = make_random_checkpoint(args.shape, dtype=sargs.dtype, seed=1, **sd.draft_shape(sargs),
                                   **(std or dict(tie_word_embeddings=False)))
    engine = sd.make_engine(sargs, model, draft, args.mode, eager=False)
    prompts = sd.make_prompts(args.batch_size, sargs.prompt_len, sargs.phrase_len, engine.model_config.vocab_size, 0)
    deadline, steps, wall, rep = time.monotonic() + args.seconds, 0, 0.0, 0
    while time.monotonic() < deadline:
        before = engine.num_steps_total
        _, seconds = sd.run_batch(engine, prompts, sargs.max_tokens, f"p{rep}")
        steps, wall, rep = steps + engine.num_steps_total - before, wall + seconds, rep + 1
    print(f"{args.mode} batch {args.batch_size}: {1e3 * wall / steps:.3f} ms per step over {steps} steps, "
          f"{sargs.max_tokens * args.batch_size * rep / wall:,.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
