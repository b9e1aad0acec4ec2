"""Sampling: logits -> tokens, for the runner and for speculative decoding.

    sampler.py            SamplingMetadata -> Sampler: penalties, temperature, min_p / top_k / top_p, seeds, logprobs
    rejection_sampler.py  lossless verification of draft tokens against the target's distribution
    argmax.py             the row-wise argmax of greedy rows (a two-stage Triton kernel on CUDA)

Nothing here knows about requests or the scheduler: a sampler sees rows of logits and their metadata.
"""
