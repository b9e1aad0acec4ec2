"""Tokenizer loading, chat templates and incremental (streaming) detokenization with stop strings."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

# Tokens of the prompt's tail decoded with each window, so that tokenizers which drop a leading
# space at the start of a decode (SentencePiece) do it to context, not to new text (as vLLM does).
_PREFIX_WINDOW = 5
_REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(model_dir: str, **kwargs: Any) -> Any:
    """A transformers fast tokenizer for the model directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, **kwargs)


def eos_token_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """All ids that end generation: the tokenizer's EOS plus generation_config.json's eos_token_id(s)
    (e.g. Llama 3 instruct's <|eot_id|>)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        for t in eos if isinstance(eos, list) else ([] if eos is None else [eos]):
            if int(t) not in ids:
                ids.append(int(t))
    return ids


def apply_chat_template(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
) -> list[int]:
    """Render `messages` with the model's chat template and tokenize without adding BOS again
    (templates include their own special tokens). Raises ValueError when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def find_stop_string(text: str, num_new_chars: int, stop: Sequence[str]) -> tuple[str, int] | None:
    """The stop string whose first occurrence overlapping the last `num_new_chars` characters comes
    earliest, and where it starts; None when no stop string appears."""
    best: tuple[str, int] | None = None
    for s in stop:
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (s, idx)
    return best


def stop_prefix_overlap(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: text that
    must be held back while streaming because the next token could complete a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one step at a time.

    Text is emitted only when it decodes cleanly: a token that ends in the middle of a multi-byte
    character (byte-level BPE, byte-fallback) yields nothing until the character is complete.
    Stop strings are found across token boundaries; the text is cut before the stop string (or after
    it with `include_stop_str_in_output`). `streamable_text` holds back a tail that could still
    become a stop string.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        # The Rust tokenizer directly: transformers' decode() wrapper costs more than the decoding.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._clean_up_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or ())
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        tail = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._ids = tail
        self._prefix_offset = 0
        self._read_offset = len(tail)
        self.num_output_tokens = 0
        self.output_text = ""
        self.stop_string: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is None:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        text = self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.clean_up_tokenization(text) if self._clean_up_spaces else text

    def _decode_pending(self, flush: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not flush):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def update(self, new_token_ids: Sequence[int], finished: bool = False) -> str | None:
        """Append tokens (and flush pending bytes when `finished`). Returns the stop string that
        ended the text, or None. After a stop string, further calls change nothing."""
        if self.stop_string is not None:
            return self.stop_string
        self._ids.extend(new_token_ids)
        self.num_output_tokens += len(new_token_ids)
        delta = self._decode_pending(flush=finished)
        self.output_text += delta
        if delta and self.stop and self.num_output_tokens >= self.min_tokens:
            found = find_stop_string(self.output_text, len(delta), self.stop)
            if found is not None:
                stop_str, idx = found
                end = idx + len(stop_str) if self.include_stop_str_in_output else idx
                self.output_text = self.output_text[:end]
                self.stop_string = stop_str
        return self.stop_string

    def streamable_text(self, finished: bool) -> str:
        """The text a client may see now (all of it once finished)."""
        if finished or self.stop_string is not None or not self.stop:
            return self.output_text
        hold = stop_prefix_overlap(self.output_text, self.stop)
        return self.output_text[: len(self.output_text) - hold]

    def decode_token(self, token_id: int) -> str:
        """One token's own text (for logprobs)."""
        if self._backend is not None:
            return self._backend.decode([token_id], skip_special_tokens=False)
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
