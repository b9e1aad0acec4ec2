"""Grammar compilation with xgrammar: one tokenizer table per model, one compile per distinct
constraint (an LRU cache in front of xgrammar's own), errors as ValueError naming the problem.

Thread-safe: the HTTP server compiles a request's grammar in a worker thread when the request
arrives (so neither the event loop nor the engine step waits for it); the engine thread then finds it
in the cache. xgrammar is imported on first use, so unconstrained serving never loads it.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from infergrid.worker.structured_output.params import StructuredOutputsParams

# Distinct compiled grammars kept (a JSON schema's compiled grammar is ~100 KB to a few MB).
CACHE_SIZE = 256

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the rest names the problem.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarError(ValueError):
    """The constraint cannot be compiled (bad schema, regex or grammar); the message says why."""


def clean_error(exc: BaseException) -> str:
    """xgrammar's error text without its source location."""
    return _CPP_PREFIX.sub("", str(exc).strip()).strip()


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer. `compile()` returns xgrammar's
    CompiledGrammar and the seconds it took (None on a cache hit)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], max_threads: int = 2) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._max_threads = max_threads
        self._compiler: Any = None
        self._cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads)
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> tuple[Any, float | None]:
        """The compiled grammar of `params` (raises GrammarError when it cannot be compiled)."""
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, None
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # the same schema arriving twice at once compiles once
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit, None
            start = time.perf_counter()
            compiled = self._compile(params)
            seconds = time.perf_counter() - start
            with self._lock:
                self._cache[key] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
                self._key_locks.pop(key, None)
        return compiled, seconds

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        kind = params.kind
        try:
            if kind == "json":
                schema = params.json
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except json.JSONDecodeError as exc:
                        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
                if not isinstance(schema, dict | bool):
                    raise GrammarError("the JSON schema must be an object")
                return compiler.compile_grammar(json_schema_ebnf(json.dumps(schema), params.any_whitespace))
            if kind == "json_object":
                return compiler.compile_grammar(json_schema_ebnf('{"type": "object"}', params.any_whitespace))
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_ebnf(params.choice or []))
            return compiler.compile_grammar(params.grammar)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"invalid {_KIND_NAMES[kind]}: {clean_error(exc)}") from exc


_KIND_NAMES = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
               "choice": "choice", "grammar": "grammar"}


# xgrammar 0.2.x's JSON strings take any code point but a few: its length-limited strings
# (minLength/maxLength) allow raw control characters, which JSON forbids (json.loads and pydantic refuse
# them), and all its strings allow UTF-16 surrogates, which are not valid UTF-8 (they decode to U+FFFD).
_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_STRICT_STRING_CHAR = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'


def no_control_characters(ebnf: str) -> str:
    """`ebnf` (as xgrammar prints a JSON schema's grammar) with JSON string characters that exclude
    the control characters U+0000..U+001F and the surrogates U+D800..U+DFFF."""
    for chars in _STRING_CHARS:
        ebnf = ebnf.replace(chars, _STRICT_STRING_CHAR)
    return ebnf


def json_schema_ebnf(schema: str, any_whitespace: bool) -> str:
    """The EBNF grammar of a JSON schema (xgrammar's conversion, with strict JSON strings)."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace, strict_mode=True)
    return no_control_characters(str(grammar))


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)
