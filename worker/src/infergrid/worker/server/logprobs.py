"""Engine logprobs -> the two OpenAI shapes (legacy completions and chat)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .protocol import CompletionLogprobs, TokenLogprob, TopLogprob

# JSON has no -inf; vLLM reports impossible tokens with this floor too.
MIN_LOGPROB = -9999.0


def finite(value: float) -> float:
    """A JSON-safe logprob."""
    if math.isnan(value):
        return MIN_LOGPROB
    return max(MIN_LOGPROB, min(0.0, value)) if math.isinf(value) else value


class LogprobFormatter:
    """Formats `CompletionOutput.logprobs` entries (dict token id -> Logprob per generated token)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def token_text(self, token_id: int, logprob: Any | None) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return decoded
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def _top(entries: dict[int, Any], num_top: int) -> list[tuple[int, Any]]:
        ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                         -kv[1].logprob))
        return ranked[:num_top]

    def completion(self, token_ids: Sequence[int], entries: Sequence[dict[int, Any]] | None, num_top: int,
                   text_offset: int = 0) -> CompletionLogprobs:
        """Legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""
        out = CompletionLogprobs()
        offset = text_offset
        for token_id, entry in zip(token_ids, entries or [], strict=False):
            sampled = entry.get(token_id)
            text = self.token_text(token_id, sampled)
            out.tokens.append(text)
            out.token_logprobs.append(finite(sampled.logprob) if sampled is not None else None)
            top = {self.token_text(t, lp): finite(lp.logprob) for t, lp in self._top(entry, num_top)}
            if sampled is not None:
                top.setdefault(text, finite(sampled.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def chat(self, token_ids: Sequence[int], entries: Sequence[dict[int, Any]] | None,
             num_top: int) -> list[TokenLogprob]:
        """Chat shape: per token {token, logprob, bytes, top_logprobs[]}."""
        content: list[TokenLogprob] = []
        for token_id, entry in zip(token_ids, entries or [], strict=False):
            sampled = entry.get(token_id)
            text = self.token_text(token_id, sampled)
            tops = [TopLogprob(token=self.token_text(t, lp), logprob=finite(lp.logprob),
                               bytes=list(self.token_text(t, lp).encode("utf-8")))
                    for t, lp in self._top(entry, num_top)]
            content.append(TokenLogprob(token=text, logprob=finite(sampled.logprob) if sampled else MIN_LOGPROB,
                                        bytes=list(text.encode("utf-8")), top_logprobs=tops))
        return content

    def sampled(self, token_ids: Sequence[int], entries: Sequence[dict[int, Any]] | None) -> list[float]:
        """Just the sampled tokens' logprobs (seed API)."""
        values = []
        for token_id, entry in zip(token_ids, entries or [], strict=False):
            lp = entry.get(token_id)
            values.append(finite(lp.logprob) if lp is not None else MIN_LOGPROB)
        return values
