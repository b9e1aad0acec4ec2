"""LLM end to end on a tiny checkpoint: seeds, stop conditions, n > 1, errors, stats."""

from __future__ import annotations

import json
import shutil

import pytest

from infergrid.worker import LLM, SamplingParams

PROMPTS = ["Hello, how are you", "The quick brown fox", "Once upon a time there", "What is two plus"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32", max_model_len=256, max_num_seqs=16, block_size=8)


def greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def test_outputs_come_back_in_prompt_order(llm):
    outs = llm.generate(PROMPTS, greedy(8))
    assert [o.prompt for o in outs] == PROMPTS
    assert all(o.finished and len(o.outputs[0].token_ids) == 8 for o in outs)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    text = llm.tokenizer.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)
    assert outs[0].outputs[0].text == text


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=42)
    alone_1 = llm.generate([PROMPTS[1]], seeded)[0].outputs[0]
    alone_2 = llm.generate([PROMPTS[1]], seeded)[0].outputs[0]
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=20), seeded, greedy(5),
                    SamplingParams(temperature=0.7, max_tokens=30, seed=1)]
    batched = llm.generate(PROMPTS, mixed_params)[1].outputs[0]
    assert alone_1.token_ids == alone_2.token_ids == batched.token_ids
    assert alone_1.text == batched.text
    other_seed = llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=43))
    assert other_seed[0].outputs[0].token_ids != alone_1.token_ids


def test_n_fans_out_into_seeded_samples(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7)
    first = llm.generate(PROMPTS[:2], params)
    second = llm.generate(PROMPTS[:2], params)
    for a, b in zip(first, second, strict=True):
        assert [c.index for c in a.outputs] == [0, 1, 2]
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert len({tuple(c.token_ids) for c in a.outputs}) == 3  # different seeds, different samples
    # sample i is the request with seed 7 + i
    single = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=12, seed=8))
    assert single[0].outputs[0].token_ids == first[0].outputs[1].token_ids
    both_greedy = llm.generate([PROMPTS[0]], greedy(6, n=2))[0]
    assert both_greedy.outputs[0].token_ids == both_greedy.outputs[1].token_ids


def _boundary_stop(llm, out) -> tuple[str, str]:
    """A stop string that spans the boundary of generated tokens 3 and 4 (and the text before it)."""
    pieces = [llm.tokenizer.decode(out.token_ids[: i + 1]) for i in range(len(out.token_ids))]
    text3, text4 = pieces[2], pieces[3]
    assert len(text4) > len(text3) >= 1
    stop = text3[-1] + text4[len(text3)]
    return stop, out.text[: out.text.index(stop)]


def test_stop_string_across_tokens(llm):
    base = llm.generate([PROMPTS[2]], greedy())[0].outputs[0]
    stop, before = _boundary_stop(llm, base)
    out = llm.generate([PROMPTS[2]], greedy(stop=[stop]))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (before, "stop", stop)
    assert len(out.token_ids) < len(base.token_ids)
    kept = llm.generate([PROMPTS[2]], greedy(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == before + stop


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate([PROMPTS[3]], greedy())[0].outputs[0]
    stop_id = base.token_ids[2]
    first = base.token_ids.index(stop_id)
    out = llm.generate([PROMPTS[3]], greedy(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]  # the stop token is the last token
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    delayed = llm.generate([PROMPTS[3]], greedy(stop_token_ids=[stop_id], min_tokens=6))[0].outputs[0]
    assert len(delayed.token_ids) >= 6
    assert stop_id not in delayed.token_ids[:5]  # banned until min_tokens


@pytest.fixture(scope="module")
def eos_llm(tiny_llama, tmp_path_factory, llm):
    """The tiny model with a second EOS id (in generation_config.json, like Llama 3's <|eot_id|>)
    chosen as a token greedy decoding of PROMPTS[0] produces early."""
    base = llm.generate([PROMPTS[0]], greedy())[0].outputs[0]
    eos = base.token_ids[3]
    path = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_llama, path)
    gen_config = json.loads((path / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [gen_config["eos_token_id"], eos]
    (path / "generation_config.json").write_text(json.dumps(gen_config))
    return LLM(str(path), dtype="float32", max_model_len=256, block_size=8), base, eos


def test_eos_ends_unless_ignore_eos(eos_llm):
    llm, base, eos = eos_llm
    first = base.token_ids.index(eos)
    out = llm.generate([PROMPTS[0]], greedy())[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    ignored = llm.generate([PROMPTS[0]], greedy(ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"
    late = llm.generate([PROMPTS[0]], greedy(min_tokens=first + 3))[0].outputs[0]
    assert eos not in late.token_ids[: first + 2] and len(late.token_ids) >= first + 3


def test_token_id_prompts_and_max_tokens_none(llm):
    ids = llm.tokenizer("Hello")["input_ids"]
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert out.prompt is None and out.prompt_token_ids == ids
    assert len(out.outputs[0].token_ids) == 256 - len(ids)  # runs to max_model_len
    assert out.outputs[0].finish_reason == "length"


def test_requests_that_cannot_fit_are_refused(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 200], greedy(100))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[0, 10_000]], greedy(4))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate(["hi"], greedy(4, prompt_logprobs=2))
    assert not llm.llm_engine.has_unfinished_requests()


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("a", PROMPTS[0], greedy(100))
    engine.add_request("b", PROMPTS[1], greedy(100))
    engine.step()
    engine.step()
    assert engine.get_stats().num_used_blocks > 0
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    assert engine.get_stats().num_used_blocks == 0


def test_stats_count_tokens(llm):
    before = llm.llm_engine.get_stats()
    outs = llm.generate(PROMPTS, greedy(5))
    after = llm.llm_engine.get_stats()
    assert after.generation_tokens_total - before.generation_tokens_total == 5 * len(PROMPTS)
    assert after.prompt_tokens_total - before.prompt_tokens_total == sum(len(o.prompt_token_ids) for o in outs)
    assert after.num_steps_total >= before.num_steps_total + 5
    assert (after.num_running, after.num_waiting) == (0, 0)


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(4))[0]
    assert out.prompt_token_ids[-2:] == llm.tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert len(out.outputs[0].token_ids) == 4
