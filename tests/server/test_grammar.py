"""response_format constraints (llguidance) on a real tokenizer: random picks among allowed tokens give valid JSON;
a model that loves digits or wants to stop still ends with valid JSON; the shipped model through `llavakit serve`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llavakit.processing.prompt import load_tokenizer
from llavakit.server.errors import BadRequest
from llavakit.server.grammar import MAX_SAFE_INTEGER, GrammarCompiler, bound_integers

from server_helpers import Server, data_url

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "tags", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(checkpoint):
    tok = load_tokenizer(checkpoint("llama"))
    return GrammarCompiler(tok, tok.tok.get_vocab_size() + 12, {2}), tok  # wider logits than the vocabulary


def _sample(compiler: GrammarCompiler, tok, grammar: str, seed: int, limit: int = 200) -> str:
    constraint = compiler.constraint(grammar)
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(limit):
        logits = constraint.mask(torch.randn(compiler.vocab_size, generator=gen))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        constraint.advance(token)
        if token == 2:
            return tok.decode(ids)
        ids.append(token)
    raise AssertionError(f"no end token within {limit} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(8))
def test_random_walks_through_the_schema_give_valid_json(compiler, seed):
    c, tok = compiler
    value = json.loads(_sample(c, tok, c.compile("json_schema", SCHEMA), seed))
    assert set(value) == {"name", "tags", "ok"} and isinstance(value["ok"], bool)
    assert len(value["name"]) <= 6 and set(value["tags"]) <= {"a", "b"} and len(value["tags"]) <= 3


def test_enum_schema_and_cache(compiler):
    c, tok = compiler
    grammar = c.compile("json_schema", {"enum": ["cat", "dog"]})
    assert c.compile("json_schema", {"enum": ["cat", "dog"]}) is grammar
    assert {_sample(c, tok, grammar, seed) for seed in range(6)} <= {'"cat"', '"dog"'}


@pytest.mark.parametrize("schema", [{"type": "no-such-type"}, {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
                                    {"type": "string", "pattern": "("}])
def test_invalid_schemas_are_400(compiler, schema):
    c, _ = compiler
    with pytest.raises(BadRequest) as e:
        c.compile("json_schema", schema)
    assert e.value.param == "response_format.json_schema.schema"


# ─────────────────────────── bounded rambling ───────────────────────────

COUNT = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"],
         "additionalProperties": False}


def test_unbounded_integers_get_i_json_bounds_and_nothing_else_changes():
    schema = {"type": "object", "$defs": {"n": {"type": ["integer", "null"]}},
              "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"type": "integer", "minimum": 0},
                             "c": {"type": "integer", "exclusiveMaximum": 10**20},
                             "d": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                             "e": {"enum": [{"type": "integer"}]}, "type": {"type": "number"}}}
    got = bound_integers(schema)
    m = MAX_SAFE_INTEGER
    assert got["$defs"]["n"] == {"type": ["integer", "null"], "minimum": -m, "maximum": m}
    assert got["properties"]["b"] == {"type": "integer", "minimum": 0, "maximum": m}  # the schema's own bound kept
    assert got["properties"]["c"] == {"type": "integer", "exclusiveMaximum": 10**20, "minimum": -m}
    assert got["properties"]["d"]["anyOf"][0] == {"type": "integer", "minimum": -m, "maximum": m}
    assert got["properties"]["e"] == {"enum": [{"type": "integer"}]}  # data, not a schema
    assert got["properties"]["type"] == {"type": "number"} and "minimum" not in got["properties"]
    assert schema["$defs"]["n"] == {"type": ["integer", "null"]}  # the caller's schema is not modified
    assert bound_integers(True) is True


def _greedy(c: GrammarCompiler, grammar: str, logits_of, limit: int = 100) -> tuple[str, int]:
    """Greedy decoding of a made-up model `logits_of(ids) -> (V,)` until the grammar is finished: (text, tokens)."""
    constraint = c.constraint(grammar)
    ids = []
    while not constraint.finished():
        assert len(ids) < limit, f"not finished within {limit} tokens: {c._tokenizer.decode(ids)!r}"
        token = int(torch.argmax(constraint.mask(logits_of(ids))))
        assert token not in c.eos_ids, "the end token was picked before the grammar was complete"
        constraint.advance(token)
        ids.append(token)
    return c._tokenizer.decode(ids), len(ids)


def _digit_ids(c: GrammarCompiler) -> list[int]:
    return [i for i in range(c._tokenizer.tok.get_vocab_size()) if c._tokenizer.decode([i]).isdigit()]


def test_a_model_that_loves_digits_still_ends_with_valid_json(compiler):
    c, _ = compiler
    logits = torch.zeros(c.vocab_size)
    logits[_digit_ids(c)] = 10.0  # digits above everything, the end token far below: it never wants to stop
    logits[2] = -10.0
    text, n = _greedy(c, c.compile("json_schema", COUNT), lambda ids: logits)
    value = json.loads(text)
    assert set(value) == {"count"} and isinstance(value["count"], int) and abs(value["count"]) <= MAX_SAFE_INTEGER
    assert n <= 30, text  # `{"count":`, at most 16 digits, `}`


def test_a_model_that_wants_to_stop_closes_the_json(compiler):
    c, _ = compiler
    digits = _digit_ids(c)
    logits = torch.zeros(c.vocab_size)
    logits[digits] = 2.0
    logits[2] = 15.0  # the end token far above: the shipped model's logits after `{"count":2`
    text, n = _greedy(c, c.compile("json_schema", COUNT), lambda ids: logits)
    assert text.endswith("}") and set(json.loads(text)) == {"count"}
    assert sum(ch.isdigit() for ch in text) <= max(len(c._tokenizer.decode([i])) for i in digits)  # one digit token
    text, _ = _greedy(c, c.compile("json_object", None), lambda ids: logits)
    assert isinstance(json.loads(text), dict)


def test_free_whitespace_is_off_even_when_the_schema_asks_for_it(compiler):
    c, tok = compiler
    schema = {**COUNT, "x-guidance": {"whitespace_flexible": True, "whitespace_pattern": " *"}}
    constraint = c.constraint(c.compile("json_schema", schema))
    allowed = torch.isfinite(constraint.mask(torch.zeros(c.vocab_size)))
    assert [tok.decode([i]) for i in allowed.nonzero().flatten().tolist()] == ["{"]


# ─────────────────────────── the shipped model, served ───────────────────────────

PICTURE = Path(__file__).resolve().parents[2] / "examples" / "picture.png"


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """`llavakit serve` with the shipped model (its --model is given, as the helper always passes one)."""
    from llavakit.cli import default_model_dir

    s = Server(default_model_dir(), "llava-shapes", [], tmp_path_factory.mktemp("logs") / "shapes.log")
    yield s
    assert s.stop() == 0, s.log_tail()


def _ask(s: Server, response_format: dict, max_tokens: int = 64) -> dict:
    image = {"type": "image_url", "image_url": {"url": data_url(PICTURE.read_bytes())}}
    status, body, _ = s.post({
        "model": "llava-shapes", "max_tokens": max_tokens, "temperature": 0, "response_format": response_format,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "How many shapes are there?"}]}]})
    assert status == 200, body
    return body


def test_the_shipped_model_answers_valid_json_and_stops(shipped_server):
    # It used to write {"count":2222... until max_tokens: it wants to stop after a digit, the grammar did not let it.
    body = _ask(shipped_server, {"type": "json_schema", "json_schema": {"name": "count", "schema": COUNT}})
    choice = body["choices"][0]
    value = json.loads(choice["message"]["content"])
    assert set(value) == {"count"} and isinstance(value["count"], int) and abs(value["count"]) <= MAX_SAFE_INTEGER
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] <= 16
    body = _ask(shipped_server, {"type": "json_object"})
    choice = body["choices"][0]
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] <= 16
