"""SamplingParams validation: defaults, normalisation, and error messages that name the field."""

import dataclasses

import pytest

from infergrid.worker.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.ignore_eos, p.seed) == (16, 0, False, None)
    assert p.stop is None and p.stop_token_ids is None and p.logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.is_greedy


def test_stop_string_and_ids_are_normalised_to_lists():
    p = SamplingParams(stop="###", stop_token_ids=(5, 7))
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 7]
    assert p.all_stop_token_ids == frozenset({5, 7})


def test_greedy_detection():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=0).is_greedy


def test_max_tokens_none_means_until_max_model_len():
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be -1 or 0 (off) or a positive integer"),
        ({"top_k": 2.5}, "top_k must be"),
        ({"min_p": 1.1}, "min_p must be in [0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"seed": 1.5}, "seed must be an integer or None"),
        ({"stop": ["ok", ""]}, "stop must not contain an empty string"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of non-negative integers"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4)"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
        ({"logprobs": MAX_LOGPROBS + 1}, f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}]"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be None or an integer"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_frozen_and_replace_revalidates():
    p = SamplingParams(max_tokens=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 9  # type: ignore[misc]
    assert dataclasses.replace(p, max_tokens=9).max_tokens == 9
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(p, max_tokens=0)
