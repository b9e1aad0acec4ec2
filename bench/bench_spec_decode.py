"""Speculative-decoding benchmark: decode tok/s with speculation off, n-gram, a shallow draft model and
draft = target, at batch 1 and batch 32, all measured in one run beside the same baseline.

The target is a random-weight checkpoint of a named shape (bench/shapes.py; default the Llama-3.2-1B
shape in bf16). Random weights give random text, so the workload is built to show each case:
- prompts repeat a short random phrase (n-gram lookup then has matches to propose from); whether
  the target's own continuation repeats too decides n-gram's acceptance (reported);
- "draft" is a random --draft-layers-layer checkpoint of the same vocabulary and the target's width
  (or --draft-hidden: a narrower draft reads a smaller LM head per pass, its main cost): its tokens
  agree with the target's about as often as chance, which measures the "never slower when
  acceptance is low" target (the guard cools its requests down: spec_decode/guard.py);
- "draft-fp8" ("copy:draft-fp8", "agree:draft-fp8"): the same draft with its LM head in FP8
  (--draft-lm-head-dtype fp8: half the bytes of its largest weight per pass);
- "draft=target" drafts with the target itself: acceptance ~1.0, the upper bound of the acceptance
  length (a draft as big as the target is no speedup, by construction);
- "copy:*" repeat off / ngram / draft on "copy" checkpoints of the same shapes: tied embeddings and
  near-zero decoder-layer weights, so the model repeats its input token (text of no interest, but
  n-gram and a 2-layer copy draft then accept ~100% while every step still reads all the weights):
  the speedup at high acceptance, at the real cost of the target and the draft;
- "agree:*" repeat off / ngram / draft at a chosen acceptance, for each --agreements p: the target is
  a copy checkpoint whose untied LM head predicts a fixed successor of its input token (one random
  cycle through the vocabulary), the draft one that predicts the same successor for a share p of the
  tokens (shapes.successor_maps), and each prompt is a stretch of the target's own successor chain
  with a share 1 - p of its tokens replaced by random ones, followed by the chain's first three
  tokens again: the target then re-generates the stretch, which n-gram lookup finds in the prompt
  (a replaced token is a rejected draft, like an edit in a quoted passage) and the draft predicts
  right at a share p of the positions. Each draft token is accepted with probability ~p given
  the ones before it, so with k drafts the acceptance rate (accepted / proposed, vLLM's) is
  (p + p^2 + ... + p^k) / k: 0.59 for p = 0.8, k = 4; p = 0.92 gives 0.80;
- "off-sync" / "copy:off-sync": speculation off and async scheduling off. Speculative decoding
  runs without async scheduling (its drafts are proposed from the tokens just sampled), so "off",
  which schedules the next step while the GPU runs this one, is the baseline every speedup is over;
  the sync rows show what async scheduling alone is worth.
Each mode gets its own engine (same arguments except the speculative ones; all alive at once, KV
pools sized for the largest batch) and a warm-up. Then, --repeats times, every (batch size B, mode)
runs once, interleaved so that drifts in the machine's speed hit every mode alike: B requests at
once, --max-tokens greedy tokens each (ignore_eos). tok/s = generated tokens / wall time, the median of the repeats (the table also shows
their range). A speedup is paired: each repeat's tok/s over its family's "off" tok/s in the same repeat
(run next to it), then the median of those ratios (the table shows their range too): the machines'
speed drifts between repeats (batch 32 "off" once went 20,072 -> 13,575 tok/s within a run), which
a ratio of medians would fold in, a same-repeat ratio mostly not. ms/step and steps are medians. Acceptance rate and
mean acceptance length (tokens emitted per verification step: 1 + accepted drafts per step) count
the drafts of all repeats. Repeat r runs prompts r*B .. r*B + B - 1 (wrapping; batch 1: a different
prompt each repeat). Greedy outputs (the first repeat's) are compared with the "off" run (token
agreement; bf16 kernels of different batch shapes may flip near-ties, so this is reported, not asserted).

    PYTHONPATH=common/src:worker/src python bench/bench_spec_decode.py --out bench/results/spec_decode.json    # GPU
    .venv/bin/python bench/bench_spec_decode.py --shape tiny --batch-sizes 1 4 --max-tokens 16 --repeats 2  # CPU smoke

Every speculative mode runs at a fixed k (--num-speculative-tokens) with the engine's guard: no drafts
in a step of more than --speculative-disable-by-batch-size sampling requests (default: the engine's,
32), and a request whose drafts keep failing cools down for a while.

Prints a table and writes JSON (--out), then a verdict per row. Targets (SPEC): >= 2x at acceptance
>= 0.8 at batch 1; never slower (>= 0.95x here, for run-to-run noise) when acceptance is low (below
0.3, or nothing verified); and, since the guard is meant to make speculation never a net loss,
>= 0.95x in every other row too (moderate acceptance, high acceptance at batch 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes import FIRST_TOKEN_ID, get_shape, make_random_checkpoint, successor_maps  # noqa: E402

from infergrid.worker.config import EngineConfig  # noqa: E402
from infergrid.worker.engine.llm_engine import LLMEngine  # noqa: E402
from infergrid.worker.sampling_params import SamplingParams  # noqa: E402

MODES = ("off", "off-sync", "ngram", "draft", "draft=target", "copy:off", "copy:off-sync", "copy:ngram", "copy:draft",
         "agree:off", "agree:ngram", "agree:draft", "draft-fp8", "copy:draft-fp8", "agree:draft-fp8")
COPY_LAYER_STD = 5e-4  # decoder-layer weights of the "copy" checkpoints (see shapes.make_random_checkpoint)
TARGET_SPEEDUP_AT_HIGH_ACCEPTANCE = 2.0
HIGH_ACCEPTANCE = 0.8
LOW_ACCEPTANCE = 0.3
NEVER_SLOWER = 0.95


@dataclass
class BatchResult:
    """One mode at one batch size."""

    mode: str
    batch_size: int
    wall_s: float  # median over the repeats (as tokens_per_s, ms_per_step and num_steps)
    output_tokens: int  # per repeat
    tokens_per_s: float
    ms_per_step: float
    num_steps: int
    repeats: int
    tokens_per_s_all: list[float]  # every repeat, in order
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_rate: float | None
    mean_acceptance_length: float | None
    accepted_per_pos: list[int]
    pipelined_share: float  # of the steps, those scheduled ahead of the previous step's tokens
    speedup: float | None = None  # median of speedup_all
    speedup_all: list[float] = field(default_factory=list)  # per repeat: tok/s over "off"'s in the same repeat
    token_agreement_with_off: float | None = None
    enforce_eager: bool = False
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # the first repeat's

    @property
    def tokens_per_s_range(self) -> str:
        return f"{min(self.tokens_per_s_all):,.0f}-{max(self.tokens_per_s_all):,.0f}"

    @property
    def speedup_range(self) -> str:
        return f"{min(self.speedup_all):.2f}-{max(self.speedup_all):.2f}" if self.speedup_all else "-"


def make_prompts(num: int, prompt_len: int, phrase_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Each prompt repeats its own random phrase of phrase_len tokens up to prompt_len tokens."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        phrase = [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(phrase_len)]
        prompts.append((phrase * (prompt_len // phrase_len + 1))[:prompt_len])
    return prompts


def make_agree_prompts(num: int, prompt_len: int, vocab_size: int, agreement: float, seed: int) -> list[list[int]]:
    """Prompts of the "agree" family (module docstring): a stretch of the target's successor chain
    from a random token with a share 1 - agreement of it replaced, then the chain's first 3 tokens."""
    succ = successor_maps(vocab_size, seed, 1.0)[0].tolist()
    rng = random.Random(seed + 1)
    prompts = []
    for _ in range(num):
        chain = [rng.randrange(FIRST_TOKEN_ID, vocab_size)]
        while len(chain) < prompt_len - 3:
            chain.append(succ[chain[-1]])
        quoted = [t if rng.random() < agreement else rng.randrange(FIRST_TOKEN_ID, vocab_size) for t in chain]
        prompts.append(quoted + chain[:3])
    return prompts


def draft_shape(args: argparse.Namespace) -> dict[str, int]:
    """Shape overrides of the random draft: --draft-layers, and --draft-hidden's width with heads of 64
    and 4 query heads per KV head (the Llama-3.2-1B proportions)."""
    shape: dict[str, int] = {"num_hidden_layers": args.draft_layers}
    if args.draft_hidden:
        h = args.draft_hidden
        shape.update(hidden_size=h, intermediate_size=4 * h, num_attention_heads=h // 64, num_key_value_heads=h // 256)
    return shape


def family(mode: str) -> str:
    """The checkpoints and prompts a mode runs on: "" (random), "copy" or "agree<p>"."""
    return mode.rpartition(":")[0]


def method(mode: str) -> str:
    return mode.rpartition(":")[2]


def engine_config(args: argparse.Namespace, model: str, mode: str, draft: str | None, eager: bool) -> EngineConfig:
    spec: dict[str, Any] = {}
    kind = method(mode)
    if kind == "ngram":
        spec = dict(speculative_method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    elif kind in ("draft", "draft=target", "draft-fp8"):
        spec = dict(speculative_method="draft", num_speculative_tokens=args.num_speculative_tokens,
                    draft_model=model if kind == "draft=target" else draft,
                    draft_lm_head_dtype="fp8" if kind == "draft-fp8" else None)
    if spec and args.speculative_disable_by_batch_size is not None:
        spec["speculative_disable_by_batch_size"] = args.speculative_disable_by_batch_size
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        max_model_len=args.prompt_len + args.max_tokens + args.num_speculative_tokens + 8,
        max_num_seqs=max(args.batch_sizes),
        enforce_eager=eager, enable_prefix_caching=False, seed=args.seed, async_scheduling=kind != "off-sync",
        **spec,
    )


def run_batch(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    finals: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return [finals[f"{tag}-{i}"] for i in range(len(prompts))], wall


def make_engine(args: argparse.Namespace, model: str, draft: str | None, mode: str, eager: bool) -> LLMEngine:
    """One mode's engine. Its KV pool is sized for the largest batch (no memory profiling), so every
    mode's engine fits on the device at once and their runs can interleave."""
    config = engine_config(args, model, mode, draft, eager)
    blocks_per_seq = -(-config.max_model_len // config.block_size)
    config = dataclasses.replace(config, num_gpu_blocks_override=max(args.batch_sizes) * blocks_per_seq + 2)
    engine = LLMEngine(config)
    for bs in args.batch_sizes:  # warm-up: every batch shape and the verification graphs
        run_batch(engine, [[FIRST_TOKEN_ID] * 8] * bs, min(args.max_tokens, 2 * args.num_speculative_tokens + 4),
                  f"warm{bs}")
    return engine


@dataclass
class _Runs:
    """The repeats of one (mode, batch): wall times, steps, tok/s, the first outputs, stat deltas."""

    walls: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] | None = None
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    per_pos: list[int] = field(default_factory=list)
    pipelined: int = 0

    def add(self, engine: LLMEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
        before, pipelined = engine.get_stats(), engine.num_pipelined_steps_total
        outputs, wall = run_batch(engine, prompts, max_tokens, tag)
        after = engine.get_stats()
        self.pipelined += engine.num_pipelined_steps_total - pipelined
        self.walls.append(wall)
        self.steps.append(after.num_steps_total - before.num_steps_total)
        self.tok_s.append(sum(len(o) for o in outputs) / wall)
        self.outputs = self.outputs if self.outputs is not None else outputs
        self.drafts += after.spec_decode_num_drafts_total - before.spec_decode_num_drafts_total
        self.draft_tokens += after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
        self.accepted += after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
        pos = _diff(after.spec_decode_num_accepted_tokens_per_pos, before.spec_decode_num_accepted_tokens_per_pos)
        self.per_pos = [a + b for a, b in zip(pos, self.per_pos + [0] * len(pos), strict=False)]

    def result(self, mode: str, bs: int, eager: bool) -> BatchResult:
        assert self.outputs is not None
        return BatchResult(
            mode=mode, batch_size=bs, wall_s=statistics.median(self.walls),
            output_tokens=sum(len(o) for o in self.outputs), tokens_per_s=statistics.median(self.tok_s),
            ms_per_step=statistics.median(1000 * w / max(1, n) for w, n in zip(self.walls, self.steps, strict=True)),
            num_steps=round(statistics.median(self.steps)), repeats=len(self.walls), tokens_per_s_all=self.tok_s,
            num_drafts=self.drafts, num_draft_tokens=self.draft_tokens, num_accepted_tokens=self.accepted,
            acceptance_rate=self.accepted / self.draft_tokens if self.draft_tokens else None,
            mean_acceptance_length=1 + self.accepted / self.drafts if self.drafts else None,
            accepted_per_pos=self.per_pos, pipelined_share=self.pipelined / max(1, sum(self.steps)),
            enforce_eager=eager, outputs=self.outputs,
        )


def run_interleaved(args: argparse.Namespace, engines: dict[str, tuple[LLMEngine, bool]],
                    prompts: dict[str, list[list[int]]]) -> list[BatchResult]:
    """Repeat r of every (batch, mode) before repeat r + 1 of any: drifts in the machine's speed
    (clocks, other tenants of the host's CPUs) then hit every mode alike."""
    runs = {(mode, bs): _Runs() for mode in engines for bs in args.batch_sizes}
    for rep in range(args.repeats):
        for bs in args.batch_sizes:
            for mode, (engine, _) in engines.items():
                fam = prompts[family(mode)]
                # Repeat r takes the r-th group of bs prompts (wrapping): batch 1 then averages over
                # prompts too, not over one prompt's luck (an "agree" prompt's acceptance varies).
                first = rep * bs % max(1, len(fam) - bs + 1)
                runs[mode, bs].add(engine, fam[first : first + bs], args.max_tokens, f"b{bs}r{rep}")
    return [runs[mode, bs].result(mode, bs, eager) for mode, (_, eager) in engines.items() for bs in args.batch_sizes]


def _diff(after: tuple[int, ...], before: tuple[int, ...]) -> list[int]:
    n = max(len(after), len(before))
    return [(after[i] if i < len(after) else 0) - (before[i] if i < len(before) else 0) for i in range(n)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated tokens equal at the same position (greedy outputs, same prompts)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        total += max(len(x), len(y))
        same += sum(1 for u, v in zip(x, y, strict=False) if u == v)
    return same / total if total else 1.0


def device_name(device: str | None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device or "cuda"))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def paired_speedups(result: BatchResult, base: BatchResult) -> list[float]:
    """Each repeat's tok/s over the baseline's in the same repeat (the repeats are interleaved)."""
    return [t / b for t, b in zip(result.tokens_per_s_all, base.tokens_per_s_all, strict=True)]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(header: str, results: list[BatchResult]) -> list[str]:
    """Prints the table; returns the verdict lines."""
    print(header)
    cols = ("mode", "batch", "tok/s (median)", "tok/s range", "speedup", "speedup range", "ms/step", "accept rate",
            "mean accept len", "steps", "pipelined", "agree w/ off")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        row = (r.mode + (" (eager)" if r.enforce_eager else ""), str(r.batch_size), f"{r.tokens_per_s:,.1f}",
               r.tokens_per_s_range, _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""), r.speedup_range,
               f"{r.ms_per_step:.2f}", _fmt(r.acceptance_rate, ".3f"), _fmt(r.mean_acceptance_length, ".2f"), str(r.num_steps),
               f"{r.pipelined_share:.0%}", _fmt(r.token_agreement_with_off, ".3f"))
        print("| " + " | ".join(row) + " |")
    verdicts = []
    for r in results:
        if method(r.mode) in ("off", "off-sync") or r.speedup is None or r.mode == "draft=target":
            continue  # (draft=target's draft costs a target)
        head = f"{r.mode} batch {r.batch_size}: " + (
            "no drafts verified" if r.acceptance_rate is None else f"acceptance {r.acceptance_rate:.2f}")
        if r.acceptance_rate is not None and r.acceptance_rate >= HIGH_ACCEPTANCE and r.batch_size == 1:
            ok = r.speedup >= TARGET_SPEEDUP_AT_HIGH_ACCEPTANCE
            verdicts.append(f"{head} -> {r.speedup:.2f}x ({'meets' if ok else 'BELOW'} the "
                            f">= {TARGET_SPEEDUP_AT_HIGH_ACCEPTANCE:g}x target at batch 1)")
        elif r.acceptance_rate is None or r.acceptance_rate < LOW_ACCEPTANCE:
            ok = r.speedup >= NEVER_SLOWER
            verdicts.append(f"{head} -> {r.speedup:.2f}x ({'meets' if ok else 'BELOW'} the never-slower target, "
                            f">= {NEVER_SLOWER:g}x)")
        else:  # moderate acceptance, or high at a larger batch: the guard should make it no net loss
            ok = r.speedup >= NEVER_SLOWER
            verdicts.append(f"{head} -> {r.speedup:.2f}x ({'no' if ok else 'A'} net loss, >= {NEVER_SLOWER:g}x)")
    for line in verdicts:
        print(line)
    return verdicts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", help="random checkpoint shape from bench/shapes.py (tiny|1b|8b)")
    p.add_argument("--model", default=None, help="use this HF checkpoint directory instead of a random shape")
    p.add_argument("--draft-model", default=None, help="draft checkpoint for the 'draft' mode (default: random)")
    p.add_argument("--draft-layers", type=int, default=2, help="layers of the random draft (same vocab)")
    p.add_argument("--draft-hidden", type=int, default=None,
                   help="width of the random draft (default: the target's; 64-wide heads, 4 per KV head)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--agreements", nargs="+", type=float, default=[0.8, 0.92],
                   help="the 'agree' modes run once for each of these draft agreements p")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=None,
                   help="no drafts above this many sampling requests per step (default: the engine's)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--phrase-len", type=int, default=16, help="prompts repeat a random phrase of this length")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per (mode, batch), interleaved across the modes; tok/s is their median")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at all")
    p.add_argument("--no-eager-retry", action="store_true",
                   help="do not retry a mode that fails with CUDA graphs in eager mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("bench", "results", "spec_decode.json"))
    args = p.parse_args(argv)
    if args.draft_hidden is not None and (args.draft_hidden < 256 or args.draft_hidden % 256):
        p.error("--draft-hidden must be a positive multiple of 256")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.dtype is None:
        on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.dtype = "bfloat16" if on_cuda else "float32"
    if any(not 0.0 < a <= 1.0 for a in args.agreements):
        p.error("--agreements must be in (0, 1]")
    modes: list[str] = []
    for m in args.modes:  # "agree:x" -> "agree0.8:x", ...
        modes += [f"agree{a:g}:{method(m)}" for a in args.agreements] if family(m) == "agree" else [m]
    for fam in dict.fromkeys(family(m) for m in modes):  # every mode is compared with its family's "off" run
        off = f"{fam}:off" if fam else "off"
        if off not in modes:
            modes.insert(0, off)
    args.modes = modes
    return args


def build_checkpoints(args: argparse.Namespace) -> tuple[dict[str, tuple[str, str | None]], dict[str, list[list[int]]]]:
    """Per family (see `family`) of args.modes: (target checkpoint, draft checkpoint) and the prompts."""
    model = args.model or make_random_checkpoint(args.shape, dtype=args.dtype, seed=args.seed)
    draft = args.draft_model
    if draft is None and ("draft" in args.modes or "draft-fp8" in args.modes):
        # Untied: a random model with tied embeddings tends to repeat its input token, and two such
        # models then "agree"; an untied random draft agrees with the target only by chance.
        draft = make_random_checkpoint(args.shape, dtype=args.dtype, seed=args.seed + 1,
                                       tie_word_embeddings=False, **draft_shape(args))
    checkpoints: dict[str, tuple[str, str | None]] = {"": (model, draft)}  # family -> (target, draft)
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        vocab_size = json.load(f)["vocab_size"]
    num_prompts = max(*args.batch_sizes, args.repeats)  # (batch 1: a different prompt each repeat)
    prompts = {"": make_prompts(num_prompts, args.prompt_len, args.phrase_len, vocab_size, args.seed)}
    for fam in dict.fromkeys(family(m) for m in args.modes):
        copy = dict(dtype=args.dtype, layer_init_std=COPY_LAYER_STD)  # near-zero layers: repeat the input
        if fam == "copy":  # tied embeddings: predict the input token
            checkpoints[fam] = (
                make_random_checkpoint(args.shape, seed=args.seed, tie_word_embeddings=True, **copy),
                make_random_checkpoint(args.shape, seed=args.seed + 1, tie_word_embeddings=True,
                                       **draft_shape(args), **copy))
            prompts[fam] = prompts[""]
        elif fam.startswith("agree"):  # untied: predict a successor of the input token
            share = float(fam.removeprefix("agree"))
            checkpoints[fam] = (
                make_random_checkpoint(args.shape, seed=args.seed, tie_word_embeddings=False,
                                       head_successor=(args.seed, 1.0), **copy),
                make_random_checkpoint(args.shape, seed=args.seed + 1, tie_word_embeddings=False,
                                       head_successor=(args.seed, share), **draft_shape(args),
                                       **copy))
            prompts[fam] = make_agree_prompts(num_prompts, args.prompt_len, vocab_size, share, args.seed)
    return checkpoints, prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    checkpoints, prompts = build_checkpoints(args)
    checkpoint_s = time.monotonic() - t0
    errors: dict[str, str] = {}
    engines: dict[str, tuple[LLMEngine, bool]] = {}
    for mode in args.modes:
        target, mode_draft = checkpoints[family(mode)]
        try:
            engines[mode] = (make_engine(args, target, mode_draft, mode, args.enforce_eager), args.enforce_eager)
        except Exception:  # keep measuring the other modes; retry once without CUDA graphs
            errors[mode] = traceback.format_exc()
            print(f"mode {mode} failed:\n{errors[mode]}", file=sys.stderr)
            if args.enforce_eager or args.no_eager_retry or not torch.cuda.is_available():
                continue
            try:
                engines[mode] = (make_engine(args, target, mode_draft, mode, True), True)
            except Exception:
                errors[mode + " (eager)"] = traceback.format_exc()
                print(f"mode {mode} failed in eager mode too:\n{errors[mode + ' (eager)']}", file=sys.stderr)
    # Every mode's engine is alive at once (models, CUDA graphs): a full garbage collection walks all
    # of them, a pause proportional to the number of engines that lands on whichever mode allocated
    # last (a server runs one engine). Frozen, the collector skips what exists now; the runs' own
    # garbage is still collected.
    gc.collect()
    gc.freeze()
    results = run_interleaved(args, engines, prompts)
    states = {mode: engine.spec_decoder.describe() for mode, (engine, _) in engines.items()
              if engine.spec_decoder is not None}
    off = {(family(r.mode), r.batch_size): r for r in results if method(r.mode) == "off"}
    for r in results:
        base = off.get((family(r.mode), r.batch_size))
        if base is not None:
            r.speedup_all = paired_speedups(r, base)
            r.speedup = statistics.median(r.speedup_all)
            r.token_agreement_with_off = agreement(r.outputs, base.outputs)
    device = device_name(args.device)
    header = (
        f"speculative decoding: {args.shape if args.model is None else args.model}, {args.dtype}, {device}; "
        f"k = {args.num_speculative_tokens}, prompts of {args.prompt_len} tokens (a {args.phrase_len}-token phrase "
        f"repeated), {args.max_tokens} greedy tokens each; draft: "
        f"{args.draft_model or f'random {args.draft_layers}-layer'}"
        f"{f', {args.draft_hidden} wide' if args.draft_hidden and not args.draft_model else ''}; tok/s: median of {args.repeats} interleaved repeats; speedup: median of same-repeat ratios"
    )
    verdicts = print_table(header, results)
    for mode, state in states.items():
        print(f"{mode}: {state}")
    report: dict[str, Any] = {
        "bench": "spec_decode",
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": None if args.model else {"name": args.shape, **asdict(get_shape(args.shape))},
        "args": vars(args),
        "checkpoint_seconds": checkpoint_s,
        "results": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in results],
        "verdicts": verdicts,
        "speculation_state": states,
        "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    missing = [m for m in args.modes if not any(r.mode == m for r in results)]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
