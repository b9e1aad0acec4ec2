"""Speculative decoding: proposers (n-gram, draft model), lossless verification, a fixed k with a guard.

    speculative_decoder.py  SpeculativeDecoder: built by the executor around the rank-0 runner and
                            handed to it as its Speculator (runner/speculator.py); the engine calls propose()
    proposer.py             Proposer: the interface of both drafters (the decoder holds one)
    ngram_proposer.py       drafts from the request's own tokens
    draft_proposer.py       drafts from a smaller model (draft_model.py: on a ModelRunner of its own,
                            through its public methods) and the files it is split into: draft_kv.py,
                            draft_batch.py, draft_passes.py, draft_sampler.py, ahead_proposer.py
    draft_loop_graph.py     the draft's CUDA graphs (GraphSets of its runner: runner/cuda_graph.py)
    ahead_graph.py
    guard.py                which requests propose (k drafts each): the batch cutoff, cool-downs

This package imports runner/ and sample/ (the rejection sampler lives there); nothing under runner/
imports it (tests/worker/test_import_graph.py).
"""
