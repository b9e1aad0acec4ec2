"""The draft model's passes run without waiting for the host: every proposal step returns exactly the
drafts (and draft distributions q) of the straightforward pass-by-pass loop, which reads each pass's
tokens back before building the next pass (with the same row order), in real engine runs (mixed numbers of drafts, greedy,
seeded and unseeded sampled requests, catch-up-only requests under a small token budget), with a
single device -> host copy per proposal step."""

from __future__ import annotations

import pytest
import torch
from spec_prompts import PROMPTS as ALL_PROMPTS

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.sample.sampler import SamplingMetadata, random_sample
from infergrid.worker.spec_decode import guard as spec_guard
from infergrid.worker.spec_decode.draft_batch import DraftBatch, DraftRequest
from infergrid.worker.spec_decode.draft_model import DraftModel

PROMPTS = ALL_PROMPTS[:5]

PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=17),
    SamplingParams(temperature=0.9, top_k=12, max_tokens=23, seed=7, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=30),
    SamplingParams(temperature=1.0, top_p=0.8, min_p=0.05, max_tokens=19, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=26),
]


@torch.inference_mode()
def reference_propose(d: DraftModel,
                      requests: list[DraftRequest]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
    """The pass-by-pass loop: each pass samples on the host before the next is prepared."""
    runner, bs = d.runner, d.block_size
    budget, first, proposing, scratch = d.max_catch_up_tokens, [], [], d.num_target_blocks
    for dr in requests:
        req = dr.request
        computed = req.num_computed_tokens
        start = d.kv.valid_prefix(dr.block_ids, computed)
        num_new = req.num_tokens - start
        if budget <= 0:
            break
        if num_new > budget:
            first.append(d.sched(req, start, req.all_token_ids[start : start + budget], dr.block_ids, False))
            d.kv.mark_valid(dr.block_ids, start, min(start + budget, computed))
            budget = 0
            continue
        table = list(dr.block_ids)
        while len(table) <= (req.num_tokens + dr.num_drafts - 2) // bs:
            table.append(scratch)
            scratch += 1
        proposing.append((dr, table, d.sched(req, start, req.all_token_ids[start:], table, True)))
        budget -= num_new
        d.kv.mark_valid(dr.block_ids, start, computed)
    # The one thing the sync-free passes change: proposing rows come in descending number of drafts
    # (stably) after the catch-up-only ones. It changes only which unseeded random draw a row gets.
    proposing.sort(key=lambda p: -p[0].num_drafts)
    first += [sched for _, _, sched in proposing]
    proposing = [(dr, table) for dr, table, _ in proposing]
    if not first:
        return {}
    d.num_catch_up_tokens_total += sum(s.num_new_tokens for s in first)
    batch = runner.prepare_inputs(first)
    hidden = runner.forward(batch)
    if not proposing:
        return {}
    tokens, probs = _sample(d, runner.compute_logits(hidden[batch.logits_indices]),
                            [dr.request for dr, _ in proposing])
    drafts = [[t] for t in tokens]
    q = [[p] if p is not None else [] for p in probs]
    for j in range(1, max(dr.num_drafts for dr, _ in proposing)):
        active = [i for i, (dr, _) in enumerate(proposing) if dr.num_drafts > j]
        scheds = [d.sched(proposing[i][0].request, proposing[i][0].request.num_tokens - 1 + j, [drafts[i][-1]],
                           proposing[i][1], True) for i in active]
        batch = runner.prepare_inputs(scheds)
        hidden = runner.forward(batch)
        tokens, probs = _sample(d, runner.compute_logits(hidden[batch.logits_indices]),
                                [proposing[i][0].request for i in active])
        for i, t, p in zip(active, tokens, probs, strict=True):
            drafts[i].append(t)
            if p is not None:
                q[i].append(p)
    return {dr.request.request_id: (drafts[i], torch.stack(q[i]) if q[i] else None)
            for i, (dr, _) in enumerate(proposing)}


def _sample(d: DraftModel, logits: torch.Tensor, requests) -> tuple[list[int], list[torch.Tensor | None]]:
    params = [r.sampling_params for r in requests]
    greedy = [p.is_greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1).tolist(), [None] * len(requests)
    temperature = [0.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]
    dev = logits.device
    meta = SamplingMetadata(temperature=torch.tensor(temperature, device=dev), all_greedy=False)
    if any(p.top_p < 1.0 for p in params):
        meta.top_p = torch.tensor([p.top_p for p in params], device=dev)
    if any(p.top_k > 0 for p in params):
        meta.top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[1] for p in params], device=dev)
    if any(p.min_p > 0 for p in params):
        meta.min_p = torch.tensor([p.min_p for p in params], device=dev)
    for i, (r, p) in enumerate(zip(requests, params, strict=True)):
        if p.seed is not None and not greedy[i]:
            meta.generators[i] = d.generator(r.request_id, p.seed)
    probs = d.sampler.compute_probs(logits, meta)
    sampled = torch.where(torch.tensor(greedy, device=dev), logits.argmax(dim=-1), random_sample(probs, meta.generators))
    return sampled.tolist(), [None if g else probs[i] for i, g in enumerate(greedy)]


@pytest.mark.parametrize(("budget", "graphs"), [(None, False), (16, False), (None, True)])
def test_sync_free_passes_propose_what_the_pass_by_pass_loop_proposes(tiny_model, monkeypatch, budget, graphs):
    """`graphs`: the CUDA-graph code path on CPU (stand-in graphs replay the forward on static buffers)."""
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)  # always k drafts (fewer only near max_tokens)
    monkeypatch.setenv("INFERGRID_EMULATE_CUDA_GRAPHS", "1" if graphs else "0")
    extra = {} if budget is None else dict(max_num_batched_tokens=budget)
    llm = LLM(tiny_model("llama"), dtype="float32", max_model_len=128, max_num_seqs=8, block_size=4,
              speculative_method="draft", num_speculative_tokens=4, draft_model=tiny_model("llama_draft"), **extra)
    proposer = llm.llm_engine.spec_decoder.proposer
    d = proposer.model
    propose = proposer.propose
    seen = {"calls": 0, "mixed_k": 0, "catch_up_only": 0, "sampled": 0}
    tolist = torch.Tensor.tolist

    def checked(requests: list[DraftRequest]) -> DraftBatch | None:
        kv, valid, caught_up = d.runner.kv_cache.clone(), d.kv.valid.copy(), d.num_catch_up_tokens_total
        gens = {k: g.get_state() for k, g in d.generators.items()}
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if d.runner.device.type == "cuda" else None  # (on a GPU machine)
        expected = reference_propose(d, requests)
        d.runner.kv_cache.copy_(kv)
        d.kv.valid[:], d.num_catch_up_tokens_total = valid, caught_up
        d.generators = {k: g for k, g in d.generators.items() if k in gens}
        for k, state in gens.items():
            d.generators[k].set_state(state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        num_copies = []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: num_copies.append(1) or tolist(t))
        try:
            got = propose(requests)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        assert not num_copies  # the drafts stay on the device
        assert d.num_catch_up_tokens_total - caught_up > 0
        values = got.to_host() if got is not None else {}
        assert values.keys() == expected.keys()
        for req_id, (drafts, probs) in expected.items():
            assert values[req_id] == drafts
            assert (probs is None) == (req_id not in got.probs)  # type: ignore[union-attr]
            if probs is not None:
                assert torch.equal(got.probs[req_id], probs)  # type: ignore[union-attr]
                seen["sampled"] += 1
        seen["calls"] += 1
        seen["mixed_k"] += len({dr.num_drafts for dr in requests}) > 1
        seen["catch_up_only"] += len(values) < len(requests)
        return got

    proposer.propose = checked
    outs = llm.generate(PROMPTS, PARAMS)
    assert [len(o.outputs[0].token_ids) for o in outs if o.outputs[0].finish_reason == "length"]
    assert seen["calls"] > 10 and seen["mixed_k"] > 0 and seen["sampled"] > 0
    if budget is not None:
        assert seen["catch_up_only"] > 0
    if graphs:  # passes 2..k replay the draft's decode graphs (one loop graph when all rows are greedy
        # and draft k), pass 1 its multi-token graphs
        assert d.runner.decode_graphs.num_replays > 0 and d.runner.multi_token_graphs.num_replays > 0
        assert d.loop_graphs is not None and d.loop_graphs.num_replays > 0
