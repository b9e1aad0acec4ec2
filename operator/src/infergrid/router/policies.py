"""Routing policies: pure functions of the candidate workers' loads and the request's routing key.

- `prefix-aware`: the key is the chained hash of the prompt's leading chunks (`infergrid.common.prefix_hash`,
  the worker's own block-hash scheme over text, since the router has no tokenizer; token-id prompts use the
  worker's exact token-block hashes). Chat requests hash their messages in order (role + content), so a
  shared system prompt gives a shared key. The key picks a worker by rendezvous hashing with BOUNDED LOAD
  (Mirrokni, Thorup, Zadimoghaddam 2018): walking the key's preference order, a worker whose in-flight
  count is at or above max(4, ceil(c * (total + 1) / n)) is skipped, so one hot prefix cannot pile onto one pod.
- `session-affinity`: the key is the session header's value, placed the same way.
- `least-load`: fewest waiting + running (from the last scrape) + this router's in-flight requests.
- `round-robin`: in turn.
A request without a key (short prompt, no session header) falls back to least-load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, Protocol

from infergrid.common.prefix_hash import hash_prompt_blocks, hash_text_prefix

_MASK64 = (1 << 64) - 1
# Block size for token-id prompts (the workers' default --block-size).
TOKEN_BLOCK_SIZE = 16
# NOTE: the load bound never goes below this many in-flight requests per worker: a worker batches, so a
# handful of requests on the worker holding their prefix costs nothing, and at low load the formula's
# bound (1 or 2) would scatter a hot prefix for no gain.
MIN_CAPACITY = 4


class Candidate(Protocol):
    """What a policy reads of a worker."""

    name: str
    name_hash: int  # 64-bit hash of the name, fixed for the worker's life
    in_flight: int  # requests this router has sent and not yet finished
    queue_load: int  # waiting + running from the last metrics scrape


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit mix."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def bounded_capacity(total_in_flight: int, num_workers: int, load_factor: float) -> int:
    """Most in-flight requests one worker may hold before the key moves on (counting the new one)."""
    return max(MIN_CAPACITY, math.ceil(load_factor * (total_in_flight + 1) / num_workers))


def pick_by_key(candidates: Sequence[Candidate], key: int, load_factor: float) -> Candidate:
    """Rendezvous hashing with bounded load: the key's most preferred worker that is under capacity."""
    if len(candidates) == 1:
        return candidates[0]
    total = 0
    for c in candidates:
        total += c.in_flight
    capacity = bounded_capacity(total, len(candidates), load_factor)
    ranked = sorted(candidates, key=lambda c: _mix64(key ^ c.name_hash), reverse=True)
    for c in ranked:
        if c.in_flight < capacity:
            return c
    return ranked[0]  # unreachable: some worker is always below the mean


def pick_least_load(candidates: Sequence[Candidate], start: int = 0) -> Candidate:
    """Fewest waiting + running + in flight; ties broken in turn from `start`."""
    n = len(candidates)
    best = candidates[start % n]
    best_load = best.queue_load + best.in_flight
    for i in range(1, n):
        c = candidates[(start + i) % n]
        load = c.queue_load + c.in_flight
        if load < best_load:
            best, best_load = c, load
    return best


def key_from_bytes(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def session_key(value: str) -> int:
    return key_from_bytes(hashlib.sha256(value.encode()).digest())


def _message_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}\x00{content if isinstance(content, str) else ''}\x1e")
    return "".join(parts)


def prefix_key(payload: Any, chunk_chars: int, max_chunks: int) -> int | None:
    """The routing key of a parsed request body: the hash of its leading prompt chunks, or None when the
    prompt is shorter than one chunk (or absent)."""
    if not isinstance(payload, dict):
        return None
    text: str | None = None
    if isinstance(messages := payload.get("messages"), list):
        text = _message_text(messages)
    else:
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, int):
                return _token_key(prompt, chunk_chars, max_chunks)
            if isinstance(first, list) and first and isinstance(first[0], int):
                return _token_key(first, chunk_chars, max_chunks)
            prompt = first
        if isinstance(prompt, str):
            text = prompt
    if not text:
        return None
    hashes = hash_text_prefix(text, chunk_chars, max_chunks)
    return key_from_bytes(hashes[-1]) if hashes else None


def _token_key(token_ids: list[Any], chunk_chars: int, max_chunks: int) -> int | None:
    if not all(isinstance(t, int) for t in token_ids[: TOKEN_BLOCK_SIZE * max_chunks]):
        return None
    hashes = hash_prompt_blocks(token_ids[: TOKEN_BLOCK_SIZE * max_chunks], TOKEN_BLOCK_SIZE)
    return key_from_bytes(hashes[-1]) if hashes else None


def prefix_key_from_body(body: bytes, chunk_chars: int, max_chunks: int) -> int | None:
    """`prefix_key` of a raw JSON body; a body that is not JSON has no key (the worker will answer 400)."""
    try:
        return prefix_key(json.loads(body), chunk_chars, max_chunks)
    except (ValueError, UnicodeDecodeError):
        return None


class Policy:
    """Chooses a worker among the ready `candidates` (never empty) for a request with routing `key`."""

    name = ""

    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor
        self._turn = 0

    def choose(self, candidates: Sequence[Candidate], key: int | None) -> Candidate:
        self._turn += 1
        return pick_least_load(candidates, self._turn)


class LeastLoad(Policy):
    name = "least-load"


class RoundRobin(Policy):
    name = "round-robin"

    def choose(self, candidates: Sequence[Candidate], key: int | None) -> Candidate:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class KeyAffinity(Policy):
    """prefix-aware and session-affinity: the key's worker under bounded load; least-load without a key."""

    def choose(self, candidates: Sequence[Candidate], key: int | None) -> Candidate:
        if key is None:
            return super().choose(candidates, key)
        return pick_by_key(candidates, key, self.load_factor)


class PrefixAware(KeyAffinity):
    name = "prefix-aware"


class SessionAffinity(KeyAffinity):
    name = "session-affinity"


POLICY_CLASSES: dict[str, type[Policy]] = {c.name: c for c in (PrefixAware, LeastLoad, SessionAffinity, RoundRobin)}


def make_policy(name: str, load_factor: float = 1.25) -> Policy:
    return POLICY_CLASSES[name](load_factor)
