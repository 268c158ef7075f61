"""`response_format` through constrained decoding with llguidance.

llguidance (the grammar engine behind Guidance, also used by vLLM and SGLang) compiles a JSON
schema into a grammar and, at every step, gives the set of tokens that keep the output a valid
prefix. It reads a `tokenizers` tokenizer's JSON directly, so no transformers is needed, and runs
on the CPU. Each request gets its own `JsonConstraint` (a matcher holds the parse state); the
engine calls `mask` before picking a token and `advance` after.

JSON is generated compactly (no free whitespace): a random or weak model cannot then spend its
whole budget on blank space, and the output is what `json.dumps(..., separators=(",", ":"))`
would write.
"""

from __future__ import annotations

import functools
import json
import threading

import numpy as np
import torch

from .errors import BadRequest

_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarCompiler:
    """Compiles response formats for one tokenizer; compiled grammars are cached by schema."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        """tokenizer: a TextTokenizer; vocab_size: rows of the model's logits; eos_ids: the model's end tokens."""
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.tok.get_vocab_size(with_added_tokens=True))
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._compile = functools.lru_cache(maxsize=64)(self._compile_uncached)

    @staticmethod
    def available() -> bool:
        """Whether llguidance is installed (the `serve` extra)."""
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return False
        return True

    def _ll(self):
        # Building the token trie takes up to a second for a 150k vocabulary: once, on first use.
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                            eos_token=self.eos_ids)
            return self._ll_tokenizer

    def compile(self, kind: str, schema: dict | bool | None) -> str:
        """A validated grammar for `json_object` (schema None) or `json_schema`; BadRequest if invalid."""
        if not self.available():
            raise BadRequest("response_format needs llguidance on the server: pip install 'llavakit[serve]'.",
                             param="response_format", code="response_format_unsupported")
        key = json.dumps({"type": "object"} if kind == "json_object" else schema, sort_keys=True)
        return self._compile(key)

    def _compile_uncached(self, schema_json: str) -> str:
        import llguidance

        param = "response_format.json_schema.schema"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise BadRequest(f"{param}: not a usable JSON schema: {e}.", param=param, code="invalid_json_schema")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll())
        if is_error:
            raise BadRequest(f"{param}: {messages[0] if messages else 'invalid schema'}.", param=param,
                             code="invalid_json_schema")
        return grammar

    def constraint(self, grammar: str) -> "JsonConstraint":
        """A fresh per-request constraint for a compiled grammar."""
        import llguidance

        matcher = llguidance.LLMatcher(self._ll(), grammar, log_level=0)
        if matcher.is_error():
            raise BadRequest(f"response_format: {matcher.get_error()}.", param="response_format",
                             code="invalid_json_schema")
        return JsonConstraint(matcher, self.eos_ids)


class JsonConstraint:
    """One request's grammar state: `mask` the logits, then `advance` with the picked token."""

    def __init__(self, matcher, eos_ids: list[int]):
        self.matcher = matcher
        self.eos_ids = eos_ids

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) float32 logits with every token that would break the grammar set to -inf."""
        v = logits.shape[-1]
        if self.matcher.is_error():  # cannot happen with masked picks; end the answer rather than ramble
            allowed = torch.zeros(v, dtype=torch.bool)
            allowed[[i for i in self.eos_ids if i < v]] = True
        else:
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[:v].astype(bool))
            if allowed.shape[0] < v:  # logits wider than the grammar's vocabulary: extra rows are never valid
                allowed = torch.cat([allowed, torch.zeros(v - allowed.shape[0], dtype=torch.bool)])
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Feed the picked token to the matcher."""
        if not self.matcher.is_error() and not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)
