"""`llavakit batch` on this machine: a folder with broken files, a killed and resumed job, JSONL and Parquet inputs.

The default model knows only coloured shapes, so about these random-noise pictures its answers are
meaningless, but deterministic: that is what is checked.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from llavakit.cli import default_model_dir, main

from batch_helpers import BROKEN, make_folder, read


def batch(*args):
    return main(["batch", "--no-progress", *map(str, args)])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    default_model_dir()  # built once, before any subprocess needs it
    return make_folder(tmp_path_factory.mktemp("batch") / "images")


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """The uninterrupted folder job (greedy, 8 tokens), records by id."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    assert batch("--input", folder, "--output", out, "--max-new-tokens", 8) == 0
    return read(out)


def test_a_folder_job_answers_every_image_and_records_the_broken_ones(reference):
    assert len(reference) == 50
    answered = {k: r for k, r in reference.items() if r["error"] is None}
    assert len(answered) == 47
    assert "sub/img01.png" in answered and "img00.png" in answered  # ids are paths relative to the folder
    for r in answered.values():
        assert isinstance(r["answer"], str) and r["finish_reason"] in ("stop", "length")
        # the picture alone is at least 21 tokens: base view and grid view of 3x3 patches, 3 newlines
        assert 1 <= r["completion_tokens"] <= 8 and r["prompt_tokens"] > 21 and r["seconds"] >= 0
    failed = {k: r for k, r in reference.items() if r["error"] is not None}
    assert set(failed) == set(BROKEN)
    for name, r in failed.items():
        assert r["answer"] is None and r["finish_reason"] is None
        assert "Could not decode" in r["error"] and name in r["error"]
    assert "truncated" in failed["truncated.png"]["error"]
    assert list(reference["img00.png"]) == ["id", "answer", "prompt_tokens", "completion_tokens", "finish_reason",
                                            "seconds", "error"]


def test_a_killed_job_resumes_to_exactly_the_uninterrupted_answers(folder, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    # One request at a time: the answers must not depend on batching, and lines arrive one by one,
    # so the kill lands half-way however fast the model answers.
    cmd = [sys.executable, "-m", "llavakit", "batch", "--input", str(folder), "--output", str(out),
           "--max-new-tokens", "8", "--max-batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline, lines = time.monotonic() + 120, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            lines = out.read_bytes().count(b"\n") if out.exists() else 0
            if lines >= 15:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert 15 <= lines < 50, f"the job was not stopped half-way ({lines} lines): {proc.stderr.read().decode()[-2000:]}"
    proc.stderr.close()
    with open(out, "ab") as f:
        f.write(b'{"id": "sub/img03.png", "answer": "cut sh')  # as if killed in the middle of a line
    before = out.read_bytes()

    assert batch("--input", folder, "--output", out, "--max-new-tokens", 8) == 2  # no silent overwrite
    assert out.read_bytes() == before
    assert batch("--input", folder, "--output", out, "--max-new-tokens", 8, "--resume") == 0
    resumed = read(out)  # raises if an id appears twice or a line is not JSON
    assert set(resumed) == set(reference)
    assert {k: (r["answer"], r["error"]) for k, r in resumed.items()} == \
        {k: (r["answer"], r["error"]) for k, r in reference.items()}


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """A JSONL file of good and bad requests beside its pictures, and the good rows alone."""
    root = tmp_path_factory.mktemp("jsonl")
    (root / "pics").mkdir()
    rs = np.random.RandomState(1)
    for name, size in (("a.png", (40, 60)), ("b.png", (64, 64))):
        Image.fromarray((rs.rand(*size, 3) * 255).astype("uint8")).save(root / "pics" / name)
    data_url = "data:image/png;base64," + base64.b64encode((root / "pics" / "a.png").read_bytes()).decode()
    q = "What is in the picture?"
    good = [
        {"id": "path", "image": "pics/a.png", "prompt": q},  # relative to the JSONL file, not the working directory
        {"id": "data-url", "image": data_url, "prompt": q},
        {"id": "messages", "messages": [{"role": "user", "content": [
            {"type": "image", "image": "pics/a.png"}, {"type": "text", "text": q}]}]},
        {"id": "default-prompt", "image": "pics/b.png"},
        {"id": "two-images", "images": ["pics/a.png", "pics/b.png"], "prompt": "Compare them."},
        {"id": "forced-length", "image": "pics/a.png", "prompt": q, "max_new_tokens": 5, "ignore_eos": True},
        {"id": "sampled", "image": "pics/a.png", "prompt": q, "temperature": 5.0, "seed": 7, "max_new_tokens": 12,
         "ignore_eos": True},
        {"id": "text-only", "prompt": "Say something."},
        {"id": "missing-file", "image": "pics/nope.png", "prompt": q},
        {"id": "too-long", "prompt": "word " * 2000},
        {"id": "bad-temperature", "prompt": q, "temperature": -1.0},
    ]
    lines = [json.dumps(r) for r in good]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"id": "path", "prompt": "again"}))  # a duplicate id
    lines.insert(7, json.dumps({"image": "pics/a.png"}))  # no id
    (root / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return root, good


def test_jsonl_requests_with_overrides_and_bad_lines(requests, tmp_path):
    root, _ = requests
    out = tmp_path / "out.jsonl"
    assert batch("--input", root / "requests.jsonl", "--output", out, "--max-new-tokens", 8) == 0
    got = read(out)
    assert len(got) == 14
    # one picture, one question: a path, a data URL and the messages form are the same request
    assert got["path"]["error"] is None and got["path"]["answer"]
    assert got["data-url"]["answer"] == got["path"]["answer"] == got["messages"]["answer"]
    assert got["path"]["prompt_tokens"] == got["messages"]["prompt_tokens"]
    for rid in ("default-prompt", "two-images", "text-only"):
        assert got[rid]["error"] is None, got[rid]
    assert got["two-images"]["prompt_tokens"] > 2 * 10  # two untiled images of 9 features and a newline
    assert got["text-only"]["prompt_tokens"] < 100
    # per-item sampling is applied: a forced length, and a seeded sample that differs from greedy
    assert got["forced-length"]["completion_tokens"] == 5 and got["forced-length"]["finish_reason"] == "length"
    assert got["sampled"]["completion_tokens"] == 12
    assert got["sampled"]["answer"] != got["path"]["answer"]
    assert "not found" in got["missing-file"]["error"] and "nope.png" in got["missing-file"]["error"]
    assert "context" in got["too-long"]["error"]
    assert "temperature must be >= 0" in got["bad-temperature"]["error"]
    # bad lines are recorded with their line number
    assert "line 4 is not valid JSON" in got["<line 4>"]["error"]
    assert "duplicate id 'path'" in got["<line 6>"]["error"] and "line 1" in got["<line 6>"]["error"]
    assert "needs an 'id'" in got["<line 8>"]["error"]

    # the same rows as Parquet give the same answers
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _, good = requests
    columns = {k for r in good for k in r}
    pq.write_table(pa.table({k: [r.get(k) for r in good] for k in columns}), root / "requests.parquet")
    out_pq = tmp_path / "from_parquet.jsonl"
    assert batch("--input", root / "requests.parquet", "--output", out_pq, "--max-new-tokens", 8) == 0
    from_pq = read(out_pq)
    assert set(from_pq) == {r["id"] for r in good}
    for rid, r in from_pq.items():
        assert (r["answer"], r["completion_tokens"]) == (got[rid]["answer"], got[rid]["completion_tokens"]), rid
        assert (r["error"] is None) == (got[rid]["error"] is None), rid
