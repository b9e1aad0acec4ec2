"""Prompts shared by the speculative-decoding engine tests: plain text, and text that repeats (n-gram
and draft proposals then get accepted)."""

PROMPTS = [
    "Hello, how are you",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Once upon a time there",
    "one, two, three, four, one, two, three, four, one, two,",
    "What is two plus",
    "The sea is blue, the sea is wide, the sea is blue, the sea is",
]
