"""Speculative decoding: proposers (n-gram, draft model), lossless verification, a fixed k with a guard."""
