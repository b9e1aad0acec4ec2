"""IncrementalDetokenizer: clean multi-byte output, stop strings across token boundaries, hold-back."""

from __future__ import annotations

import pytest

from infergrid.worker.tokenizer import (
    IncrementalDetokenizer,
    apply_chat_template,
    find_stop_string,
    load_tokenizer,
    stop_prefix_overlap,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """Feed one token at a time; return the text visible after each token."""
    seen = []
    for i, t in enumerate(token_ids):
        detok.update([t], finished=i == len(token_ids) - 1)
        seen.append(detok.streamable_text(finished=i == len(token_ids) - 1))
    return seen


def test_multibyte_characters_are_emitted_only_when_complete(tokenizer):
    text = "Hi é日本 🙂 ok"
    prompt = tokenizer("The")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()) + 6  # the non-ASCII characters are split into byte tokens
    detok = IncrementalDetokenizer(tokenizer, prompt)
    seen = stream(detok, ids)
    assert seen[-1] == text
    assert all("\ufffd" not in s for s in seen)
    assert any(a == b for a, b in zip(seen, seen[1:], strict=False))  # some tokens had to wait
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # text only grows


def test_pending_bytes_are_flushed_when_finished(tokenizer):
    ids = tokenizer("日", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2
    detok = IncrementalDetokenizer(tokenizer, [0])
    detok.update(ids[:1])
    assert detok.output_text == ""
    detok.update([], finished=True)
    assert detok.output_text == "\ufffd"  # an incomplete character at the end is still reported


def test_stop_string_across_token_boundary(tokenizer):
    ids = tokenizer("Hello world, the end", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert "o w" not in pieces and "o w" in "".join(pieces)  # spans two tokens
    for include, expected in ((False, "Hell"), (True, "Hello w")):
        detok = IncrementalDetokenizer(tokenizer, [0], stop=["o w", "zzz"], include_stop_str_in_output=include)
        stopped_at = None
        for i, t in enumerate(ids):
            if detok.update([t]) is not None:
                stopped_at = i
                break
        assert detok.stop_string == "o w"
        assert detok.output_text == expected
        assert "".join(pieces[: stopped_at + 1]).find("o w") >= 0


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    ids = tokenizer("Hello world, the end", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [0], stop=["the end"])
    visible = []
    for t in ids:
        stop = detok.update([t])
        visible.append(detok.streamable_text(finished=False))
        if stop:
            break
    assert detok.stop_string == "the end"
    assert all(not v.rstrip().endswith(("t", "th", "the")) for v in visible)
    assert visible[-1] == "Hello world, "


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer("ab ab ab", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [0], stop=["ab"], min_tokens=len(ids))
    for t in ids[:-1]:
        assert detok.update([t]) is None
    assert detok.update(ids[-1:]) == "ab"


def test_skip_special_tokens(tokenizer):
    ids = tokenizer("hi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert IncrementalDetokenizer(tokenizer, [0]).update(ids) is None
    detok = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=False)
    detok.update(ids, finished=True)
    assert detok.output_text == "hi</s>"


def test_stop_helpers():
    assert find_stop_string("abcSTOPdefEND", 6, ["END", "STOP"]) == ("END", 10)
    assert find_stop_string("abcSTOPdefEND", 13, ["END", "STOP"]) == ("STOP", 3)
    assert find_stop_string("abc", 3, ["x"]) is None
    assert stop_prefix_overlap("hello wor", ["world", "or"]) == 3
    assert stop_prefix_overlap("hello", ["xyz"]) == 0


def test_chat_template_renders_and_tokenizes(tokenizer):
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
