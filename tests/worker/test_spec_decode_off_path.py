"""The cheap path of a step in which no request speculates: AdaptiveNumDrafts.can_skip says so only
when asking every request would return 0 and change nothing, and an engine that takes the shortcut
makes the same decisions (same draft-model steps, same drafts, same counters) as one that asks
every request every step."""

from __future__ import annotations

import copy
import random

import pytest

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.spec_decode.adaptive import CHECK, AdaptiveNumDrafts
from infergrid.worker.spec_decode.cost_model import StepCostModel
from infergrid.worker.spec_decode.goodput_guard import GoodputGuard


def _states(a: AdaptiveNumDrafts) -> dict:
    return {k: (s.accepted, s.trials, s.on_from, s.next_check, s.wait, s.num_steps, s.checking)
            for k, s in a._states.items()}


def test_can_skip_only_when_asking_every_request_would_change_nothing():
    rng = random.Random(0)
    a = AdaptiveNumDrafts(max_k=4)
    running: list[str] = []
    num_skips = num_checks = 0
    for step in range(3000):
        if rng.random() < 0.01 or not running:  # arrivals (some sampled with a seed: their own clock)
            running.append(f"{'s' if rng.random() < 0.1 else 'r'}{step}")
        if rng.random() < 0.01 and len(running) > 1:
            a.remove(running.pop(rng.randrange(len(running))))
        ids = set(rng.sample(running, max(1, len(running) - rng.randrange(2))))  # now and then one does not sample
        num_checks += 1
        if a.can_skip(step, ids):
            num_skips += 1
            before, probe = _states(a), copy.deepcopy(a)
            assert all(probe.num_drafts(r, 0.2, None if r[0] == "s" else step) == 0 for r in ids)
            assert _states(probe) == before
            continue
        for r in ids:
            own = None if r[0] == "s" else step
            k = a.num_drafts(r, 0.2, own)
            if k == CHECK:
                a.observe_check(r, 8 if rng.random() < 0.05 else 0, 8, 0.2, own)
            elif k:
                a.observe(r, k, k if rng.random() < 0.05 else 0)
    assert num_skips > 0.3 * num_checks  # the shortcut is the common case once requests are off
    assert not AdaptiveNumDrafts(max_k=2, enabled=False).can_skip(1, set())
    fresh = AdaptiveNumDrafts(max_k=2)
    assert fresh.can_skip(3, set()) and not fresh.can_skip(3, {"new"})  # a new request gets its state


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_engine_decisions_are_the_same_with_and_without_the_shortcut(tiny_model, monkeypatch, method):
    monkeypatch.setenv("INFERGRID_SPEC_DECODE_ADAPTIVE", "1")
    # A random draft priced at 0.1 of a step: tried, rejected, then probed now and then.
    monkeypatch.setattr(StepCostModel, "draft_token_cost", lambda self, batch_size, measured=True: 0.1)
    # (the pipelined ratio, the calibration and the proposer's cost come from measured timings)
    monkeypatch.setattr(StepCostModel, "calibration", lambda self, batch_size: 1.0)
    monkeypatch.setattr(StepCostModel, "pipelined_ratio", lambda self, batch_size: 1.0)
    monkeypatch.setattr(StepCostModel, "observe_proposer", lambda self, seconds_per_pass, step_seconds: None)
    monkeypatch.setattr(GoodputGuard, "blocks", lambda self, batch_size, step: False)  # (measured goodput)
    prompts = ["Hello, how are you", "Once upon a time there", "What is two plus", "The quick brown fox"]
    params = [SamplingParams(temperature=0.0, max_tokens=60 + 9 * i, ignore_eos=True) for i in range(3)]
    params.append(SamplingParams(temperature=1.0, max_tokens=20, seed=4, ignore_eos=True))  # its own clock
    spec = dict(speculative_method=method, num_speculative_tokens=3)
    if method == "draft":
        spec["draft_model"] = tiny_model("llama_draft")
    runs, skipped = [], []
    can_skip = AdaptiveNumDrafts.can_skip
    for shortcut in (True, False):
        monkeypatch.setattr(AdaptiveNumDrafts, "can_skip",
                            lambda self, step, ids, on=shortcut: skipped.append(on and can_skip(self, step, ids))
                            or skipped[-1])
        llm = LLM(tiny_model("llama"), dtype="float32", max_model_len=256, max_num_seqs=8, block_size=8, **spec)
        decoder = llm.llm_engine.spec_decoder
        log: list[tuple[int, dict]] = []
        propose = decoder.propose

        def logged(*args, propose=propose, decoder=decoder, log=log):
            drafts = propose(*args)
            log.append((decoder.num_steps, {k: list(v) for k, v in drafts.items()}))
            return drafts

        decoder.propose = logged
        outs = llm.generate(prompts, params)
        s = llm.llm_engine.get_stats()
        runs.append((log, [o.outputs[0].token_ids for o in outs], s.spec_decode_num_draft_tokens_total,
                     s.spec_decode_num_accepted_tokens_total, s.num_steps_total))
    assert runs[0] == runs[1]
    log = runs[0][0]
    assert sum(1 for _, d in log if d) >= 4  # proposals happened (first tries and probes)
    if method == "draft":  # (n-gram drafts of the tiny model's loops are accepted: they stay on)
        assert sum(skipped) > 0.5 * len(log)  # most steps of the first run took the shortcut
