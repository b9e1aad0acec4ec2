"""Drafts proposed ahead (DraftProposer.propose_ahead): the draft model proposes a request's next
drafts right behind the verification, before anyone knows how many drafts it accepts. Whatever
the verification accepts (none, some, all), those drafts are exactly the ones the pass-by-pass loop
proposes once the result is known (sampled ones too, with their distributions, from the same random
draws); greedy output stays identical to no speculation; requests that cannot use them (seeded,
penalties, stopped, near the end of the context) fall back to the normal proposal."""

from __future__ import annotations

import glob
import os
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file
from spec_prompts import PROMPTS
from test_spec_decode_draft_passes import reference_propose

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.spec_decode import guard as spec_guard
from infergrid.worker.spec_decode.draft_batch import DraftRequest

BASE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, block_size=4)


@pytest.fixture(scope="module")
def noisy_draft(tiny_model, tmp_path_factory) -> str:
    """The target with noise on its weights: a draft whose drafts are accepted some of the time."""
    target = tiny_model("llama")
    out = str(tmp_path_factory.mktemp("noisy-draft"))
    shutil.copytree(target, out, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for path in glob.glob(os.path.join(out, "*.safetensors")):
        tensors = load_file(path)
        noisy = {name: t + 0.6 * t.std() * torch.randn(t.shape, generator=gen) if t.dim() > 1 else t
                 for name, t in tensors.items()}
        save_file(noisy, path, metadata={"format": "pt"})
    return out


def _llm(target: str, draft: str, **extra) -> LLM:
    return LLM(target, **BASE, speculative_method="draft", num_speculative_tokens=4, draft_model=draft, **extra)


PARAMS = [  # greedy and unseeded sampled requests propose ahead, in the same batches
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=50, max_tokens=36, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.02, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=29, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
]


GREEDY_PARAMS = [SamplingParams(temperature=0.0, max_tokens=40 - 3 * i, ignore_eos=True) for i in range(6)]


@pytest.mark.parametrize(("graphs", "params", "varying_k"),
                         [(False, PARAMS, False), (True, PARAMS, False), (True, GREEDY_PARAMS, False),
                          (True, GREEDY_PARAMS, True)],
                         ids=["eager", "graphs", "graphs-greedy", "graphs-greedy-varying-k"])
def test_drafts_proposed_ahead_equal_the_pass_by_pass_loop(tiny_model, noisy_draft, monkeypatch, graphs, params,
                                                          varying_k):
    """`graphs`: the CUDA-graph code path on CPU (stand-in graphs replay the forward on static buffers);
    an all-greedy batch in the steady state proposes in one replay (ahead_graph.py), also when its
    requests verify different numbers of drafts (`varying_k`, as the token budget or max_tokens trim
    them: the replay pads the sampled rows). Greedy drafts must be equal always; sampled drafts and their
    distributions q when the loop replays the same random draws (the same rows, each drafting k
    tokens, from the same RNG state)."""
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)  # always k drafts
    monkeypatch.setenv("INFERGRID_EMULATE_CUDA_GRAPHS", "1" if graphs else "0")
    llm = _llm(tiny_model("llama"), noisy_draft)
    decoder = llm.llm_engine.spec_decoder
    proposer = decoder.proposer
    d = proposer.model  # the draft model's state (runner, KV validity, graphs)
    if varying_k:  # 1..max_k drafts, by request and step
        calls = Counter()

        propose = proposer.propose_drafts

        def varying(wanted, unverified):
            for i, (sched, _) in enumerate(wanted):
                calls[sched.request_id] += 1
                wanted[i] = (sched, 1 + (calls[sched.request_id] * 3 + sum(map(ord, sched.request_id))) % d.max_k)
            return propose(wanted, unverified)

        monkeypatch.setattr(proposer, "propose_drafts", varying)
    propose_ahead, use_ahead = proposer.propose_ahead, proposer.use_ahead
    rng_at_ahead = {}
    accepted = Counter()  # drafts accepted in the verification the ahead drafts followed
    seen = Counter()

    def rng_state():  # (the CUDA generator's too, on a GPU machine)
        return torch.get_rng_state(), torch.cuda.get_rng_state() if d.runner.device.type == "cuda" else None

    def set_rng_state(state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def recorded(requests, sampled):
        rng_at_ahead["state"] = rng_state()
        return propose_ahead(requests, sampled)

    def checked(ahead, requests, batch):
        kv, valid, caught_up = d.runner.kv_cache.clone(), d.kv.valid.copy(), d.num_catch_up_tokens_total
        rng = rng_state()
        set_rng_state(rng_at_ahead["state"])
        expected = reference_propose(d, [DraftRequest(dr.request, dr.block_ids, dr.num_drafts) for dr in requests])
        set_rng_state(rng)
        d.runner.kv_cache.copy_(kv)
        d.kv.valid[:], d.num_catch_up_tokens_total = valid, caught_up
        got = use_ahead(ahead, requests, batch)
        values = got.to_host()
        same_draws = (len(requests) == len(ahead.requests) and all(dr.num_drafts == d.max_k for dr in requests)
                      and [ahead.requests[dr.request.request_id][0] for dr in requests] == list(range(len(requests))))
        for dr in requests:
            req = dr.request
            drafts, q = expected[req.request_id]
            if req.sampling_params.is_greedy:
                assert values[req.request_id] == drafts
                seen["greedy"] += 1
            elif same_draws:
                assert values[req.request_id] == drafts
                assert torch.allclose(got.probs[req.request_id][: dr.num_drafts], q, atol=1e-5)
                seen["sampled"] += 1
            _, assumed, _ = ahead.requests[req.request_id]
            accepted[(req.num_tokens - assumed.num_computed_tokens - 2, assumed.num_drafts)] += 1
        return got

    proposer.propose_ahead, proposer.use_ahead = recorded, checked
    outs = llm.generate(PROMPTS, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert decoder.proposer.num_ahead_proposals_total == sum(accepted.values()) > 20
    assert seen["greedy"] > 10 and (seen["sampled"] > 5 or params is GREEDY_PARAMS)
    # Every outcome of a verification: no draft accepted, some, all of them.
    assert any(a == 0 for a, _ in accepted) and any(0 < a < k for a, k in accepted)
    assert any(a == k for a, k in accepted)
    if graphs:
        assert d.loop_graphs is not None and d.loop_graphs.num_replays > 0
    if params is GREEDY_PARAMS:
        assert d.ahead_graphs is not None and d.ahead_graphs.num_replays > 0
    if varying_k:
        assert {k for _, k in accepted} == set(range(1, d.max_k + 1))


def test_greedy_identical_with_drafts_proposed_ahead(tiny_model, noisy_draft, monkeypatch):
    """Mixed batches: greedy requests take drafts proposed ahead, the sampled one and the one with
    penalties the normal proposal, in the same steps; a small context limit cuts requests short."""
    monkeypatch.setattr(spec_guard, "MIN_MEAN_ACCEPTED", 0.0)  # always k drafts
    params = [
        SamplingParams(temperature=0.0, max_tokens=60),
        SamplingParams(temperature=0.0, max_tokens=33, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, max_tokens=30, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=45, stop=["e"]),
        SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),  # up to max_model_len
        SamplingParams(temperature=0.0, max_tokens=21),
    ]
    limits = dict(max_model_len=96)
    baseline = LLM(tiny_model("llama"), **{**BASE, **limits}).generate(PROMPTS, params)
    llm = LLM(tiny_model("llama"), **{**BASE, **limits}, speculative_method="draft", num_speculative_tokens=4,
              draft_model=noisy_draft)
    outs = llm.generate(PROMPTS, params)
    for out, base, p in zip(outs, baseline, params, strict=True):
        if p.is_greedy:
            assert out.outputs[0].token_ids == base.outputs[0].token_ids
            assert out.outputs[0].finish_reason == base.outputs[0].finish_reason
    decoder = llm.llm_engine.spec_decoder
    assert decoder.proposer.num_ahead_proposals_total > 0
    stats = llm.llm_engine.get_stats()
    assert 0 < stats.spec_decode_num_accepted_tokens_total < stats.spec_decode_num_draft_tokens_total
