"""Sampling parameters for one request (names and defaults as in vLLM / the OpenAI API)."""

from __future__ import annotations

from dataclasses import dataclass

from infergrid.worker.structured_output.params import StructuredOutputsParams

# Greedy when temperature is below this (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# Most top logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(name: str, value: object, low: float | None, high: float | None, rule: str) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output.

    - `temperature=0` is greedy; `top_k` of -1 or 0 means off; `min_p=0` means off.
    - `max_tokens=None` means "until max_model_len" (the engine computes the limit per prompt).
    - `stop` (strings) is checked by the detokenizer; `stop_token_ids` and EOS by the scheduler.
      EOS is ignored when `ignore_eos`; neither EOS nor stop token ids end a request before
      `min_tokens` tokens were generated.
    - `logprobs=k` returns the top-k logprobs (plus the sampled token's) for every generated token.
    - `structured_outputs` constrains the output to a grammar (JSON schema, regex, choice, EBNF):
      tokens the grammar forbids are masked, and EOS is allowed only once the grammar is complete.
    `stop` may be given as one string; it is stored as a list.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_number("temperature", self.temperature, 0.0, None, ">= 0")
        _check_number("top_p", self.top_p, 0.0, 1.0, "in (0, 1]")
        if self.top_p == 0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        _check_number("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_number("repetition_penalty", self.repetition_penalty, None, None, "> 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        self._normalise_stops()
        _check_int("max_tokens", self.max_tokens, 1, optional=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
            if self.min_tokens:  # (a complete grammar allows only EOS, which min_tokens would ban)
                raise ValueError("min_tokens cannot be combined with a structured output constraint")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    def _normalise_stops(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            stop = list(stop)
            if not all(isinstance(s, str) for s in stop):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in stop):
                raise ValueError("stop must not contain an empty string")
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        if ids is not None:
            ids = list(ids)
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(
                    f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}"
                )
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature ~ 0 or top_k == 1)."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when sampling reads the tokens generated so far (presence/frequency/repetition penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def reads_output_tokens(self) -> bool:
        """True when sampling a token needs the tokens before it on the host (penalties count them, a
        grammar matcher advances over them): such a request's step waits for the previous one."""
        return self.has_penalties or self.structured_outputs is not None

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        """The request's own stop token ids (EOS is added by the scheduler unless ignore_eos)."""
        return frozenset(self.stop_token_ids or ())
