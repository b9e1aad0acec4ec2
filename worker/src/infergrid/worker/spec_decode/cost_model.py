"""What one draft token costs, as a fraction of a request's share of an engine step (adaptive.py's c).

An engine step over N tokens takes about

    step_seconds(N) = a + b * N        (a: weights read, launches, host work; b: per-token compute)

In a decode batch of B requests a request's share of the step is (a + b*B) / B, and verifying one
more token for it costs b, so a draft token costs

    verify(B) = b * B / (a + b * B)

of that share: almost nothing at batch 1 on a GPU (a >> b), a large part of the step at a large batch.
Proposing costs the proposer's time per draft position (a draft-model pass, the n-gram lookups) over
the step's time, so c(B) = verify(B) + proposer.

a and b are fitted online to the engine's decode steps (least squares with exponentially decaying
weights), pulled toward a prior, b = a / fixed_cost_tokens (32 tokens on a CPU,
GPU_FIXED_COST_TOKENS on a GPU, which decodes memory-bound up to far larger batches), twice: where
recent steps barely differ in size (PRIOR_TOKEN_VARIANCE), and where the slope is noisy, by its
standard error (the residual scatter of the step times over the spread of their sizes, at least
TIMING_NOISE_FLOOR of a step) against a prior known to within 100%. So steps of equal size keep the
prior, noise-free or widely spread sizes are fitted, and noisy steps of nearly equal sizes (a batch
of 32 in which a few requests carry drafts) stay near the prior: their
raw slope once priced a draft token at a whole step on a noisy H200 host (0.009 ms + 0.087 ms/token),
and nothing corrected it, since only synchronous steps feed the fit and none ran after that.
The proposer's share is an average of steady-state measurements, starting from a static estimate.
`measured=False` gives the defaults alone: for decisions that must not depend on timing.

Async scheduling: a step in which nothing speculates is pipelined (the host's work overlaps the
GPU's), a speculating step is not. `pipelined_ratio(B)` (rho) is a pipelined decode step's time over the
fitted synchronous time at its size (measured pipelined steps are averaged per batch-size bucket --
1, 2-3, 4-7, ...: how much pipelining hides differs between batch 1 and batch 64 -- and priced by the
current fit; 1 until there are some), so a request off speculation emits 1 / rho tokens per
synchronous step's time, which is what its drafts must beat (adaptive.best_num_drafts'
`plain_goodput`). Batch-wide, a speculating step makes every request in it lose the pipelining, not
only the ones that draft: `speculation_pays` weighs the drafters' extra tokens against that, for the
whole step.

The batch-level prediction rests on a model (i.i.d. acceptance at each request's rate, a linear step
time, a proposer cost per position) that can be optimistic: lookups that miss, acceptance that comes
in runs, host work a speculating step adds. So each speculating step's *realized* goodput (tokens
emitted per second, proposing included) is compared with what was predicted for it, and the ratio
(kappa, averaged per batch-size bucket) scales later predictions: the check then compares what
speculation has actually delivered, corrected for the acceptance now expected, with what pipelined
steps actually deliver.
"""

from __future__ import annotations

from typing import Any

# The default: a step's fixed cost equals the cost of this many tokens. On a GPU, where a decode step
# reads every weight whatever its batch, far more: with steps of one size only (speculating at batch
# 1: 1 + k tokens), 32 made verification at batch 32 look like half a step, and speculation was never
# tried there (a 2-layer draft of a 1B model paid 1.3x at batch 32 on an H200).
DEFAULT_FIXED_COST_TOKENS = 32
GPU_FIXED_COST_TOKENS = 256
# On a GPU a draft model's passes are queued on the device behind the verification, so their device time
# lands in the next step's measured time (the fit); what the proposer term measures is the host's work
# per draft position. Its prior: about what a 2-layer draft of a 1B target measured on an H200
# (0.03-0.13 of a step). The draft's share of the weights as the prior counted the device time twice
# and kept a draft that was switched off early off for good (the prior is only corrected by proposing).
GPU_DRAFT_HOST_COST = 0.1
PRIOR_TOKEN_VARIANCE = 4.0  # how much spread in step sizes (tokens^2) it takes to trust the data's slope
TIMING_NOISE_FLOOR = 0.02  # a step time's scatter is taken to be at least 2% of the mean step
STEP_DECAY = 0.95  # per step: the fit follows about the last 20 decode steps (a batch size changes)
PROPOSER_DECAY = 0.9
PIPELINED_DECAY = 0.9
MIN_PIPELINED_RATIO = 0.3
CALIBRATION_DECAY = 0.8  # per speculating step: kappa follows about the last 5
MIN_CALIBRATION, MAX_CALIBRATION = 0.25, 2.0
MAX_STEP_SAMPLE = 3.0  # a step slower than 3x the prediction (a GC pause, a compile) counts as 3x
MIN_PROPOSER_LIMIT = 0.1  # ... and a proposer sample as 3x max(the estimate, the default, this)


class StepCostModel:
    """Online estimate of a draft token's cost at a given decode batch size.

    Args:
        proposer_cost: the proposer's time per draft position as a fraction of a target step, before
            any measurement (the draft model's share of the weights; 0 for n-gram lookups).
        fixed_cost_tokens: the prior: a step's fixed cost in tokens' worth of compute.
    """

    def __init__(self, proposer_cost: float, fixed_cost_tokens: int = DEFAULT_FIXED_COST_TOKENS) -> None:
        self.default_proposer_cost = self.proposer_cost = proposer_cost
        self.fixed_cost_tokens = fixed_cost_tokens
        self._pipelined: dict[int, tuple[float, float, float]] = {}  # bucket -> decayed (weight, tokens, seconds)
        self._calibration: dict[int, float] = {}  # bucket -> kappa
        self._prediction: tuple[int, float] | None = None  # (batch size, tokens/s) of the step about to run
        self._w = self._n = self._t = self._nn = self._nt = self._tt = 0.0  # decayed weight and sums

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One decode step (no prefill chunk) of `num_tokens` tokens (drafts included) took `seconds`."""
        if self._w > 0:
            a, b = self.coefficients()
            seconds = min(seconds, MAX_STEP_SAMPLE * (a + b * num_tokens))
        d = STEP_DECAY
        self._w = d * self._w + 1.0
        self._n = d * self._n + num_tokens
        self._t = d * self._t + seconds
        self._nn = d * self._nn + num_tokens * num_tokens
        self._nt = d * self._nt + num_tokens * seconds
        self._tt = d * self._tt + seconds * seconds

    def observe_proposer(self, seconds_per_pass: float, step_seconds: float) -> None:
        """The proposer took `seconds_per_pass` per draft position in a step of `step_seconds`.

        NOTE: a sample counts as MAX_STEP_SAMPLE times the estimate at most (a kernel compiled on
        first use, a GC pause): an inflated estimate would switch speculation off, and then nothing
        is proposed that could measure it again."""
        if step_seconds > 0:
            limit = MAX_STEP_SAMPLE * max(self.proposer_cost, self.default_proposer_cost, MIN_PROPOSER_LIMIT)
            sample = min(seconds_per_pass / step_seconds, limit)
            self.proposer_cost = PROPOSER_DECAY * self.proposer_cost + (1 - PROPOSER_DECAY) * sample

    def observe_pipelined_step(self, num_tokens: int, seconds: float) -> None:
        """A pipelined decode step of `num_tokens` tokens took `seconds` (finish to finish)."""
        key, d = batch_bucket(num_tokens), PIPELINED_DECAY
        w, n, t = self._pipelined.get(key, (0.0, 0.0, 0.0))
        self._pipelined[key] = (d * w + 1.0, d * n + num_tokens, d * t + seconds)

    def pipelined_ratio(self, batch_size: int) -> float:
        """rho at this decode batch size: the mean pipelined step of about that size (or of the nearest
        size measured) over the current fit's time at its mean size (1 before any pipelined step)."""
        sums = _nearest(self._pipelined, batch_size)
        if sums is None or self._w == 0:
            return 1.0
        w, n, t = sums
        a, b = self.coefficients()
        fitted = a + b * n / w
        return max(MIN_PIPELINED_RATIO, min(1.0, t / w / fitted)) if fitted > 0 else 1.0

    def plain_goodput(self, batch_size: int, measured: bool = True) -> float:
        """Tokens a request off speculation emits per synchronous step's time (1 / rho)."""
        return 1.0 / self.pipelined_ratio(batch_size) if measured else 1.0

    def speculation_pays(self, batch_size: int, draft_cost: float, extra_tokens: float, num_draft_tokens: int,
                         max_k: int) -> bool:
        """Whether a synchronous step of `batch_size` requests whose drafters are expected to emit
        `extra_tokens` more than one token each beats running the step without drafts, pipelined.
        `draft_cost` is c at this batch size (draft_token_cost): its verification part is paid per
        draft token (`num_draft_tokens` in all), its proposer part per draft position (`max_k`):

            kappa * (B + extra) / (1 + verify * drafts / B + proposer * max_k)  >  B / rho

        A step found to pay is remembered as the prediction `observe_speculating_step` checks."""
        proposer = min(self.proposer_cost, draft_cost)
        verify = draft_cost - proposer
        relative_time = 1.0 + verify * num_draft_tokens / batch_size + proposer * max_k
        predicted = (batch_size + extra_tokens) / relative_time  # tokens per synchronous step's time
        pays = self.calibration(batch_size) * predicted > batch_size * self.plain_goodput(batch_size)
        if pays and self._w > 0:
            a, b = self.coefficients()
            self._prediction = (batch_size, predicted / (a + b * batch_size))
        return pays

    def observe_speculating_step(self, batch_size: int, num_emitted: int, seconds: float | None) -> None:
        """The step predicted by the last `speculation_pays` that paid ran: `batch_size` requests emitted
        `num_emitted` tokens in `seconds` (proposing included; None: not a comparable decode step).
        Updates kappa for its batch size."""
        prediction, self._prediction = self._prediction, None
        if prediction is None or seconds is None or seconds <= 0 or prediction[0] != batch_size:
            return
        sample = max(MIN_CALIBRATION, min(MAX_CALIBRATION, num_emitted / seconds / prediction[1]))
        key = batch_bucket(batch_size)
        kappa = self._calibration.get(key, 1.0)
        self._calibration[key] = CALIBRATION_DECAY * kappa + (1 - CALIBRATION_DECAY) * sample

    def discard_prediction(self) -> None:
        """The step the last paying check predicted will run without drafts after all."""
        self._prediction = None

    def calibration(self, batch_size: int) -> float:
        """kappa at this batch size (or the nearest size measured): realized over predicted goodput of
        speculating steps (1 before any)."""
        return _nearest(self._calibration, batch_size, 1.0)

    def describe(self) -> str:
        a, b = self.coefficients()
        rho = ", ".join(f"{2 ** (key - 1)}+: {self.pipelined_ratio(2 ** (key - 1)):.2f}"
                        for key in sorted(self._pipelined)) or "-"
        kappa = ", ".join(f"{2 ** (key - 1)}+: {k:.2f}" for key, k in sorted(self._calibration.items())) or "-"
        return (f"step = {1e3 * a:.3f} ms + {1e3 * b:.4f} ms/token, pipelined ratio by batch size {{{rho}}}, "
                f"realized/predicted speculation by batch size {{{kappa}}}, "
                f"proposer {self.proposer_cost:.3f} of a step per draft position")

    def coefficients(self) -> tuple[float, float]:
        """(a, b) of step_seconds(N) = a + b * N; before any step, the default ratio in step units."""
        if self._w == 0:
            return 1.0, 1.0 / self.fixed_cost_tokens
        w = self._w
        mean_n, mean_t = self._n / w, self._t / w
        var_n = max(0.0, self._nn / w - mean_n * mean_n)
        covariance = self._nt / w - mean_n * mean_t
        prior_b = mean_t / (self.fixed_cost_tokens + mean_n)
        # The slope, pulled toward the prior where the sizes barely differ ...
        b = (covariance + PRIOR_TOKEN_VARIANCE * prior_b) / (var_n + PRIOR_TOKEN_VARIANCE)
        # ... and where it is noisy: its standard error (residual scatter, unbiased: w - 2 degrees of
        # freedom) against a prior known to within 100%.
        if w <= 3.0 or var_n == 0.0:
            b = prior_b
        elif prior_b > 0.0:
            var_t = max(0.0, self._tt / w - mean_t * mean_t)
            residual = max(var_t - covariance * covariance / var_n, 0.0) * w / (w - 2.0)
            residual = max(residual, (TIMING_NOISE_FLOOR * mean_t) ** 2)
            data_precision = w * var_n / residual  # 1 / (the slope's standard error)^2
            prior_precision = 1.0 / (prior_b * prior_b)
            b = (data_precision * b + prior_precision * prior_b) / (data_precision + prior_precision)
        b = max(0.0, b)
        return max(0.0, mean_t - b * mean_n), b

    def draft_token_cost(self, batch_size: int, measured: bool = True) -> float:
        """c at a decode batch of `batch_size` requests (measured=False: the defaults only)."""
        a, b = self.coefficients() if measured else (1.0, 1.0 / self.fixed_cost_tokens)
        step = a + b * batch_size
        verify = b * batch_size / step if step > 0 else 1.0
        return verify + (self.proposer_cost if measured else self.default_proposer_cost)


def _nearest(by_bucket: dict[int, Any], batch_size: int, default: Any = None) -> Any:
    """The value of batch_size's bucket, else of the nearest bucket measured (the larger on a tie): the
    tail of a batch whose requests finish one by one passes through sizes measured rarely, and
    pipelining and calibration change smoothly with the size."""
    if not by_bucket:
        return default
    key = batch_bucket(batch_size)
    return by_bucket[min(by_bucket, key=lambda b: (abs(b - key), -b))]


def batch_bucket(batch_size: int) -> int:
    """Batch sizes 1, 2-3, 4-7, 8-15, ... -> 1, 2, 3, 4, ..."""
    return max(1, batch_size).bit_length()
