"""The outer check that speculation is never a net loss: delivered tokens per second, measured.

adaptive.py and cost_model.py decide from a model of a step (acceptance, a linear step cost, the
pipelining a speculating step gives up), calibrated by speculating steps in steady state. What the
model leaves out is what switching costs: the synchronous step without drafts that precedes a
request's first drafts, the draft model's catch-up over the tokens it missed while off, and steps
in which only some requests of the batch draft but all of them wait. Near break-even the controller
switches back and forth, and those costs made speculation a net loss (an H200, 1B target, 2-layer
draft, batch 32, acceptance ~0.6: 0.77-0.87x of off, where the draft always on was 1.03x).

GoodputGuard measures what the engine delivered, per batch-size bucket (1, 2-3, 4-7, ...): tokens
emitted per second, finish to finish, over the synchronous decode steps (those run because some
request speculates: the switching steps are among them) and over the pipelined ones. Where the
synchronous steps delivered less, by more than MARGIN, after about MIN_SAMPLES of each, that
bucket is blocked: no request switches on and no draft is proposed there for a backoff of engine
steps (doubling with each block, from MIN_BLOCK to MAX_BLOCK; back to MIN_BLOCK when speculation
is found to pay). Then speculation may run again and is judged on fresh samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergrid.worker.spec_decode.cost_model import batch_bucket

DECAY = 0.95  # per sample of a kind: the goodputs follow about the last 20 steps of each kind
MIN_SAMPLES = 6.0  # decayed weight of each kind before a judgement (7 steps)
MARGIN = 0.05  # synchronous steps may deliver this much less (noise) before the bucket is blocked
MIN_BLOCK, MAX_BLOCK = 256, 4096  # engine steps
# A synchronous step counts as this many pipelined steps' time at most: a draft model's first pass
# over a whole prompt (or a kernel compiled on first use) is paid once per request, not every ~20 steps.
MAX_SAMPLE_STEPS = 6.0


@dataclass(slots=True)
class _Goodput:
    """Decayed sums over steps of one kind: weight, tokens emitted, seconds."""

    weight: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.weight = DECAY * self.weight + 1.0
        self.tokens = DECAY * self.tokens + tokens
        self.seconds = DECAY * self.seconds + seconds

    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class _Bucket:
    synchronous: _Goodput
    pipelined: _Goodput
    blocked_until: int = -1  # engine step
    block: int = MIN_BLOCK  # the next block's length


class GoodputGuard:
    """Blocks speculation at a batch size where synchronous steps delivered fewer tokens per second
    than pipelined ones (see the module docstring)."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self.num_blocks_total = 0

    def observe(self, batch_size: int, pipelined: bool, num_emitted: int, seconds: float, step: int) -> None:
        """A decode step of `batch_size` requests, run `pipelined` or not, emitted `num_emitted` tokens
        in `seconds` (since the previous step finished) at engine step `step`."""
        if seconds <= 0:
            return
        bucket = self._bucket(batch_size)
        if pipelined:
            bucket.pipelined.add(num_emitted, seconds)
        if pipelined or step < bucket.blocked_until:  # (a synchronous step while blocked: not speculation's)
            return
        if bucket.pipelined.weight > 0:
            seconds = min(seconds, MAX_SAMPLE_STEPS * bucket.pipelined.seconds / bucket.pipelined.weight)
        bucket.synchronous.add(num_emitted, seconds)
        if bucket.synchronous.weight < MIN_SAMPLES or bucket.pipelined.weight < MIN_SAMPLES:
            return
        if bucket.synchronous.per_second() < (1.0 - MARGIN) * bucket.pipelined.per_second():
            bucket.blocked_until = step + bucket.block
            bucket.block = min(2 * bucket.block, MAX_BLOCK)
            bucket.synchronous = _Goodput()  # judged afresh after the block
            self.num_blocks_total += 1
        elif bucket.synchronous.per_second() >= bucket.pipelined.per_second():
            bucket.block = MIN_BLOCK

    def blocks(self, batch_size: int, step: int) -> bool:
        """Whether speculation is blocked at this batch size now."""
        bucket = self._buckets.get(batch_bucket(batch_size))
        return bucket is not None and step < bucket.blocked_until

    def describe(self, step: int) -> str:
        parts = []
        for key, b in sorted(self._buckets.items()):
            state = f"blocked {b.blocked_until - step} more steps" if step < b.blocked_until else "open"
            parts.append(f"{2 ** (key - 1)}+: {b.synchronous.per_second():,.0f} vs {b.pipelined.per_second():,.0f} "
                         f"tok/s, {state}")
        return f"goodput synchronous vs pipelined {{{'; '.join(parts) or '-'}}}, {self.num_blocks_total} blocks"

    def _bucket(self, batch_size: int) -> _Bucket:
        key = batch_bucket(batch_size)
        if key not in self._buckets:
            self._buckets[key] = _Bucket(_Goodput(), _Goodput())
        return self._buckets[key]
