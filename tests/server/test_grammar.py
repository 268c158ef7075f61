"""response_format constraints (llguidance) on a real tokenizer: random picks among allowed tokens give valid JSON."""

from __future__ import annotations

import json

import pytest
import torch

from llavakit.processing.prompt import load_tokenizer
from llavakit.server.errors import BadRequest
from llavakit.server.grammar import GrammarCompiler

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
