"""The decisions of adaptive k during a spec-decode benchmark run, for debugging the controller.

Runs bench_spec_decode.py with the given arguments and logs, per engine step, every batch-level check
(predicted goodput against the bar), every switch-off and every hindsight check with the request's
estimated acceptance; then prints the log of each mode's runs (the first --max-lines decisions) and a
count per event kind:

    python bench/trace_adaptive.py --modes agree:draft --agreements 0.92 --repeats 3 -- --max-lines 80
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_spec_decode  # noqa: E402

from infergrid.worker.spec_decode.adaptive import AdaptiveNumDrafts  # noqa: E402
from infergrid.worker.spec_decode.cost_model import StepCostModel  # noqa: E402

EVENTS: list[str] = []


def _record(_owner: Any, text: str) -> None:
    EVENTS.append(text)


def install() -> None:
    """Wraps the controller's decision points so that each records what it saw and decided."""
    pays = StepCostModel.speculation_pays

    def logged_pays(self, batch_size, draft_cost, extra, num_draft_tokens, max_k):
        result = pays(self, batch_size, draft_cost, extra, num_draft_tokens, max_k)
        proposer = min(self.proposer_cost, draft_cost)
        relative = 1.0 + (draft_cost - proposer) * num_draft_tokens / batch_size + proposer * max_k
        _record(self, f"pays B={batch_size} extra={extra:.2f} drafts={num_draft_tokens} k={max_k} "
                      f"predicted={(batch_size + extra) / relative:.2f} kappa={self.calibration(batch_size):.2f} "
                      f"bar={batch_size * self.plain_goodput(batch_size):.2f} -> {result}")
        return result

    StepCostModel.speculation_pays = logged_pays  # type: ignore[method-assign]
    check = AdaptiveNumDrafts.observe_check

    def logged_check(self, req_id, matched, positions, draft_cost, step, plain_goodput=1.0, now=True):
        check(self, req_id, matched, positions, draft_cost, step, plain_goodput, now)
        _record(self, f"check {req_id} step={step} matched={matched:.1f}/{positions} c={draft_cost:.3f} "
                      f"bar={plain_goodput:.2f} rate={self.acceptance_rate(req_id):.2f} on={self.is_on(req_id)}")

    AdaptiveNumDrafts.observe_check = logged_check  # type: ignore[method-assign]
    switch_off = AdaptiveNumDrafts.switch_off

    def logged_switch_off(self, req_id, step):
        _record(self, f"batch-off {req_id} step={step} rate={self.acceptance_rate(req_id):.2f}")
        switch_off(self, req_id, step)

    AdaptiveNumDrafts.switch_off = logged_switch_off  # type: ignore[method-assign]
    add = bench_spec_decode._Runs.add

    def logged_add(self, engine, prompts, max_tokens, tag):
        spec = engine.spec_decoder
        _record(None, f"run {tag} {spec.method if spec is not None else 'off'}: {len(prompts)} prompts")
        add(self, engine, prompts, max_tokens, tag)
        _record(None, f"end {tag}: {self.tok_s[-1]:.0f} tok/s, {self.steps[-1]} steps")

    bench_spec_decode._Runs.add = logged_add  # type: ignore[method-assign]


def main() -> int:
    argv = sys.argv[1:]
    max_lines = 200
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
        if extra[:1] == ["--max-lines"]:
            max_lines = int(extra[1])
    install()
    code = bench_spec_decode.main(argv)
    kinds = collections.Counter(line.split()[0] + (" " + line.split()[-1] if line.startswith("pays") else "")
                                for line in EVENTS)
    print(f"\n== adaptive-k events: {dict(kinds)}")
    shown = 0
    for line in EVENTS:  # every run marker, and the first max_lines decisions
        if line.startswith(("run ", "end ")) or shown < max_lines:
            print(line)
            shown += not line.startswith(("run ", "end "))
    return code


if __name__ == "__main__":
    sys.exit(main())
