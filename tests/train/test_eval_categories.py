"""`llavakit eval --score shapes`: per-type and per-tag accuracy, describe recall, JSON; a stub VLM, no model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llavakit import cli
from llavakit.train.evaluate import CONDITION_ROWS, TYPE_ROWS, evaluate_file, score_answer


class StubVLM:
    """Answers each conversation with the text planned for its last question; records what it was asked."""

    parallel = None

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[list[dict]] = []

    def sampling_params(self, **values):
        assert values["temperature"] == 0.0
        return values

    def generate(self, conversations, params):
        self.asked += conversations
        outs = []
        for conv in conversations:
            assert conv[-1]["role"] == "user"  # cut before the answer being scored
            question = "".join(p["text"] for p in conv[-1]["content"] if p.get("type") == "text")
            outs.append(SimpleNamespace(text=self.answers[question.strip()]))
        return outs


def line(id_: str, qtype: str, turns: list[tuple[str, str]], tags=(), image="img.png") -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": id_, "type": qtype, "tags": list(tags), "image": image, "conversations": conv}


# (record, the stub's answer, right with shapes?, right exactly?)
CASES = [
    (line("d1", "describe", [("Describe the picture.", "A red circle and a blue square.")], ["size:small"]),
     "There is a blue square and a red circle.", True, False),
    (line("d2", "describe", [("Tell me what you see.", "A red circle, a blue square and a green triangle.")],
          ["size:large", "jpeg"]), "A red circle and a blue square.", False, False),  # recall 2/3
    (line("c1", "count", [("How many shapes are there?", "There are three shapes.")], ["size:small"]),
     "3", True, False),
    (line("c2", "count", [("How many objects?", "There are two shapes.")], ["size:medium", "paraphrase"]),
     "There are two shapes.", True, True),
    (line("k1", "colour", [("Where is the circle?", "The circle is at the top."),
                           ("What colour is the circle?", "The circle is red.")], ["size:medium", "multi-turn"]),
     "Red.", True, False),
    (line("p1", "position", [("Is the circle left or right of the square?", "The circle is left of the square.")],
          ["aspect:wide", "size:medium"]), "The circle is right of the square.", False, False),
    (line("w1", "where", [("Where is the triangle?", "The triangle is in the top left.")],
          ["size:large", "aspect:wide"]), "Upper-left corner.", True, False),
    (line("w2", "where", [("Which region holds the circle?", "The circle is in the top left.")],
          ["size:large", "paraphrase"]), "At the top.", False, False),
    (line("m1", "motion", [("Which way does the red circle move?", "The red circle moves left.")], ["size:small"]),
     "It moves to the left.", True, False),
    # An old-world line: a type the scorer does not know falls back to exact match.
    (line("x1", "caption", [("Describe the picture in one sentence.", "A red circle on a white background.")]),
     "A red circle on a white background.", True, True),
]


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec, *_ in CASES))
    return path


@pytest.fixture()
def stub() -> StubVLM:
    return StubVLM({rec["conversations"][-2]["value"].replace("<image>\n", ""): got for rec, got, *_ in CASES})


def test_exact_scoring_is_unchanged(data, stub):
    result = evaluate_file(stub, data, progress=False)
    assert result.score == "exact"
    assert sum(result.correct.values()) == sum(exact for *_, exact in CASES) == 2
    assert sum(result.total.values()) == len(CASES) and result.total["colour"] == 1
    table = result.table()
    assert table.splitlines()[0] == "| question type | correct | accuracy |"
    assert "| **overall** | 2/10 | **20.0%** |" in table
    assert {w["id"] for w in result.wrong} == {rec["id"] for rec, _, _, exact in CASES if not exact}


def test_shapes_scoring_per_type_and_tag(data, stub):
    result = evaluate_file(stub, data, progress=False, score="shapes")
    assert [o.right for o in result.outcomes] == [right for _, _, right, _ in CASES]
    cats = {c.name: c for c in result.categories()}
    # The seven types and the conditions are listed even when empty, in the spec's order; others follow.
    names = [c.name for c in result.categories()]
    assert names[:7] == list(TYPE_ROWS) and names[7] == "caption" and names[8:15] == list(CONDITION_ROWS)
    assert (cats["describe"].correct, cats["describe"].total) == (1, 2)
    assert (cats["where"].correct, cats["where"].total) == (1, 2)
    assert (cats["compare"].correct, cats["compare"].total) == (0, 0) and cats["compare"].accuracy is None
    assert (cats["size:small"].correct, cats["size:small"].total) == (3, 3)
    assert (cats["size:medium"].correct, cats["size:medium"].total) == (2, 3)
    assert (cats["size:large"].correct, cats["size:large"].total) == (1, 3)
    assert (cats["aspect:wide"].correct, cats["aspect:wide"].total) == (1, 2)
    assert (cats["paraphrase"].correct, cats["paraphrase"].total) == (1, 2)
    assert (cats["multi-turn"].correct, cats["multi-turn"].total) == (1, 1)
    assert (cats["jpeg"].correct, cats["jpeg"].total) == (0, 1)
    d = cats["describe"].as_dict()
    assert d["fully_right"] == 0.5 and d["shape_recall"] == pytest.approx((1 + 2 / 3) / 2)
    assert d["shape_precision"] == 1.0
    assert cats["size:large"].as_dict()["shape_recall"] == pytest.approx(2 / 3)
    assert cats["count"].as_dict()["shape_recall"] is None
    assert result.accuracy == pytest.approx(7 / 10)
    # The multi-turn line was asked with its first answer in place and the second cut off.
    k1 = next(c for c in stub.asked if len(c) == 3)
    assert k1[1]["content"][0]["text"] == "The circle is at the top."


def test_category_table_and_json_agree(data, stub):
    result = evaluate_file(stub, data, progress=False, score="shapes")
    table = result.category_table().splitlines()
    assert table[0].startswith("| category | correct | accuracy | describe fully right | describe shape recall |")
    assert "| describe | 1/2 | 50.0% | 50.0% | 83.3% |" in table
    assert "| compare | 0/0 | – |  |  |" in table
    assert "| size:large | 1/3 | 33.3% | 0.0% | 66.7% |" in table
    assert "| **overall** | 7/10 | **70.0%** | 50.0% | 83.3% |" in table
    doc = json.loads(json.dumps(result.to_json(wrong=2)))
    assert doc["score"] == "shapes" and doc["questions"] == 10 and len(doc["wrong"]) == 2
    assert doc["overall"]["correct"] == 7 and doc["overall"]["accuracy"] == pytest.approx(0.7)
    rows = {c["category"]: c for c in doc["categories"]}
    assert [c["category"] for c in doc["categories"]] == [c.name for c in result.categories()]
    assert rows["where"] == {"category": "where", "kind": "type", "correct": 1, "total": 2, "accuracy": 0.5,
                             "describe_total": 0, "fully_right": None, "shape_recall": None,
                             "shape_precision": None}
    assert rows["size:small"]["kind"] == "tag" and rows["size:small"]["accuracy"] == 1.0


def test_score_answer_falls_back_to_exact():
    # A reference the shapes scorer cannot read (the old world's two-shape "where") is matched exactly.
    ref = "the triangle top right; the circle top left"
    assert score_answer("shapes", "where", ref, ref) == ("where", True, None, None, True)
    assert score_answer("shapes", "where", "top right", ref)[1] is False
    assert score_answer("shapes", "color", "Red.", "blue")[:2] == ("colour", False)
    assert score_answer("exact", "color", "Blue.", "blue") == ("color", True, None, None, False)
    with pytest.raises(ValueError, match="score must be one of exact, shapes"):
        evaluate_file(None, Path("x.jsonl"), score="fuzzy")


def test_records_keep_tags(tmp_path):
    from llavakit.train.data import read_records

    path = tmp_path / "t.jsonl"
    rows = [line("a", "count", [("q", "a")], ["jpeg", "size:small"]), line("b", "count", [("q", "a")])]
    rows[1]["tags"] = "not a list"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.tags for r in read_records(path)] == [("jpeg", "size:small"), ()]


def test_cli_eval_shapes_table_and_json(data, stub, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: stub)
    assert cli.main(["eval", "--data", str(data), "--score", "shapes"]) == 0
    out = capsys.readouterr().out
    assert "| where | 1/2 | 50.0% |  |  |" in out and "| multi-turn | 1/1 | 100.0% |  |  |" in out
    assert cli.main(["eval", "--data", str(data), "--score", "shapes", "--json", "--show-wrong", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["overall"]["correct"] == 7 and len(doc["wrong"]) == 1
    assert cli.main(["eval", "--data", str(data)]) == 0
    assert "| **overall** | 2/10 | **20.0%** |" in capsys.readouterr().out
