"""`response_format` through constrained decoding with llguidance.

llguidance (the grammar engine behind Guidance, also used by vLLM and SGLang) compiles a JSON
schema into a grammar and, at every step, gives the set of tokens that keep the output a valid
prefix. It reads a `tokenizers` tokenizer's JSON directly, so no transformers is needed, and runs
on the CPU. Each request gets its own `JsonConstraint` (a matcher holds the parse state); the
engine calls `mask` before picking a token and `advance` after.

What the model can ramble in is bounded, so that a weak model still ends with valid JSON:
- JSON is generated compactly (no free whitespace, whatever a schema's "x-guidance" asks): a
  model cannot spend its whole budget on blank space, and the output is what
  `json.dumps(..., separators=(",", ":"))` would write.
- An integer the schema leaves unbounded is kept within I-JSON's interoperable range
  ±(2**53 - 1) (RFC 7493: what every JSON parser reads exactly), so at most 16 digits: a model
  that keeps preferring digits (the shipped tiny model wrote `{"count":2222...` until max_tokens)
  must close the number.
- The probability the model gives to its end token while the grammar forbids ending is moved to
  the tokens that close the open JSON (`"`, `}`, `]`) instead of being spread over every legal
  token: a model that wants to stop finishes the JSON and stops, rather than rambling on in a
  number or string it did not mean to write.
- Once the grammar is complete (only the end may follow), `finished()` is true and the request
  ends at once with "stop" (engine/request.py), without a step spent on the end token.
"""

from __future__ import annotations

import functools
import json
import math
import threading

import numpy as np
import torch

from .errors import BadRequest

# Applied over a schema's own "x-guidance" options: free whitespace would let a model ramble in blanks.
_JSON_OVERRIDES = {"whitespace_flexible": False, "whitespace_pattern": None}
# I-JSON (RFC 7493) integers: exact in every JSON parser (IEEE doubles), and at most 16 digits long.
MAX_SAFE_INTEGER = 2**53 - 1
# Keywords whose values are data, not subschemas: a `{"type": "integer"}` inside them is left alone.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "x-guidance"})
# The bytes of tokens that close an open JSON string, object or array.
_CLOSING_BYTES = frozenset(b'"}]')


def bound_integers(schema):
    """A copy of a JSON schema in which every integer without a bound on a side gets I-JSON's bound there.

    Bounds the schema sets itself (minimum/exclusiveMinimum, maximum/exclusiveMaximum), even
    beyond I-JSON's range, are kept: only what the schema leaves open is closed. Every subschema
    is reached ($defs, properties, items, anyOf, ...) by walking all values except data keywords.
    A properties map is walked too, but cannot be mistaken for an integer schema: its values are
    schemas (dicts or booleans), never the string "integer".
    """
    if isinstance(schema, list):
        return [bound_integers(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYWORDS else bound_integers(v) for k, v in schema.items()}
    types = out.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_SAFE_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_SAFE_INTEGER
    return out


class GrammarCompiler:
    """Compiles response formats for one tokenizer; compiled grammars are cached by schema."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        """tokenizer: a TextTokenizer; vocab_size: rows of the model's logits; eos_ids: the model's end tokens."""
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.tok.get_vocab_size(with_added_tokens=True))
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._closing_ids = None  # (C,) int64: ids of the tokens made only of `_CLOSING_BYTES` (found in `_ll`)
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

                ll = llguidance.LLTokenizer(self._tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                            eos_token=self.eos_ids)
                closing = []
                for i in range(ll.vocab_size):
                    text = ll.decode_bytes([i])
                    if text and set(text) <= _CLOSING_BYTES and not ll.is_special_token(i):
                        closing.append(i)
                self._closing_ids = torch.tensor(closing, dtype=torch.long)
                self._ll_tokenizer = ll
            return self._ll_tokenizer

    def compile(self, kind: str, schema: dict | bool | None) -> str:
        """A validated grammar for `json_object` (schema None) or `json_schema`; BadRequest if invalid."""
        if not self.available():
            raise BadRequest("response_format needs llguidance on the server: pip install 'llavakit[serve]'.",
                             param="response_format", code="response_format_unsupported")
        key = json.dumps(bound_integers({"type": "object"} if kind == "json_object" else schema), sort_keys=True)
        return self._compile(key)

    def _compile_uncached(self, schema_json: str) -> str:
        import llguidance

        param = "response_format.json_schema.schema"
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=_JSON_OVERRIDES)
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
        return JsonConstraint(matcher, self.eos_ids, self._closing_ids)


class JsonConstraint:
    """One request's grammar state: `mask` the logits, then `advance` with the picked token."""

    def __init__(self, matcher, eos_ids: list[int], closing_ids: torch.Tensor):
        """closing_ids: (C,) int64 ids of the tokens made only of `"`, `}` and `]`."""
        self.matcher = matcher
        self.eos_ids = eos_ids
        self.closing_ids = closing_ids

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) float32 logits with every token that would break the grammar set to -inf.

        While the grammar forbids ending, the end token's probability goes to the allowed closing
        tokens (split evenly; see the module docstring), and to nothing else.
        """
        v = logits.shape[-1]
        eos = [i for i in self.eos_ids if i < v]
        if self.matcher.is_error():  # cannot happen with masked picks; end the answer rather than ramble
            allowed = torch.zeros(v, dtype=torch.bool)
            allowed[eos] = True
        else:
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[:v].astype(bool))
            if allowed.shape[0] < v:  # logits wider than the grammar's vocabulary: extra rows are never valid
                allowed = torch.cat([allowed, torch.zeros(v - allowed.shape[0], dtype=torch.bool)])
        masked = logits.masked_fill(~allowed, float("-inf"))
        if eos and not bool(allowed[eos].any()):
            closing = self.closing_ids[self.closing_ids < v]
            closing = closing[allowed[closing]]
            if closing.numel():
                # p'(c) = p(c) + p(end) / C, in logits: a model that wants to stop closes the JSON
                spill = torch.logsumexp(logits[eos], 0) - math.log(closing.numel())
                masked[closing] = torch.logaddexp(masked[closing], spill)
        return masked

    def finished(self) -> bool:
        """Whether the grammar is complete: nothing but the end token may follow."""
        return self.matcher.is_stopped()

    def advance(self, token_id: int) -> None:
        """Feed the picked token to the matcher."""
        if not self.matcher.is_error() and not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)
