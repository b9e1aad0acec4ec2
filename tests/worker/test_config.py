"""EngineConfig validation and derived values."""

import dataclasses

import pytest

from infergrid.worker.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig


def test_defaults_use_vllm_names_and_values():
    c = EngineConfig(model="/models/x")
    assert (c.dtype, c.max_model_len, c.block_size, c.gpu_memory_utilization) == ("auto", None, 16, 0.9)
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.enforce_eager) == (256, None, False)
    assert (c.enable_prefix_caching, c.tensor_parallel_size, c.seed) == (True, 1, 0)
    assert (c.speculative_method, c.num_speculative_tokens, c.draft_model) == (None, 0, None)
    assert c.speculative_disable_by_batch_size == 32
    assert c.device is None and c.num_gpu_blocks_override is None


def test_token_budget_is_derived_not_written_back():
    c = EngineConfig(model="m")
    assert c.get_max_num_batched_tokens() == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert c.max_num_batched_tokens is None
    assert EngineConfig(model="m", max_num_batched_tokens=64).get_max_num_batched_tokens() == 64
    big = EngineConfig(model="m", max_num_seqs=4096, speculative_method="ngram", num_speculative_tokens=3)
    assert big.get_max_num_batched_tokens() == 4096 * 4


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig(model="m").block_size = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "model must be a non-empty path"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"max_model_len": 0}, "max_model_len must be an integer >= 1"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization must be in (0, 1]"),
        ({"gpu_memory_utilization": 1.2}, "gpu_memory_utilization must be in (0, 1]"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an integer >= 1"),
        ({"enforce_eager": "yes"}, "enforce_eager must be a bool"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1"),
        ({"speculative_method": "medusa"}, "speculative_method must be None or one of ngram, draft"),
        ({"num_speculative_tokens": 2}, "num_speculative_tokens must be 0 when speculative_method is None"),
        ({"speculative_method": "ngram"}, "num_speculative_tokens must be >= 1"),
        ({"speculative_method": "draft", "num_speculative_tokens": 2}, "draft_model must be set"),
        ({"draft_model": "/d"}, "draft_model is only used when speculative_method is 'draft'"),
        ({"speculative_disable_by_batch_size": 0}, "speculative_disable_by_batch_size must be an integer >= 1"),
        ({"speculative_disable_by_batch_size": None}, "speculative_disable_by_batch_size must be an integer >= 1"),
        ({"speculative_disable_by_batch_size": True}, "speculative_disable_by_batch_size must be an integer >= 1"),
        ({"speculative_disable_by_batch_size": 8}, "speculative_disable_by_batch_size is only used when speculative_method"),
        ({"device": ""}, "device must be None or a device string"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"num_gpu_blocks_override": 1}, "num_gpu_blocks_override must be an integer >= 2"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    kwargs = {"model": "m", **kwargs}
    with pytest.raises(ValueError) as info:
        EngineConfig(**kwargs)
    assert message in str(info.value)
