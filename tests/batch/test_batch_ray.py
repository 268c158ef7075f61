"""`llavakit batch --ray`: the folder job on a local Ray instance (2 CPUs, 2 replicas) equals the local job.

Ray's start-up dominates (about 10 s); every wait is bounded.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

import llavakit
from llavakit.batch import JobConfig, run_local
from llavakit.cli import default_model_dir

from batch_helpers import make_folder, read


def _need_ray():
    """pyarrow, or a skip when the llavakit[ray] extra is not installed (looked up, not imported: Ray is heavy)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the Ray path needs the llavakit[ray] extra")
    return pytest.importorskip("pyarrow")


def test_the_ray_job_gives_the_local_answers(tmp_path):
    _need_ray()
    folder = make_folder(tmp_path / "images")
    local = tmp_path / "local.jsonl"
    run_local(llavakit.load(default_model_dir()), folder, local, JobConfig(max_new_tokens=8), progress=False)

    out = tmp_path / "ray.jsonl"
    cmd = [sys.executable, "-m", "llavakit", "batch", "--ray", "--replicas", "2", "--cpus-per-replica", "1",
           "--input", str(folder), "--output", str(out), "--max-new-tokens", "8", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # Its own session: on a timeout the driver and the Ray processes it started go together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate(timeout=30)
        pytest.fail(f"the Ray job took over 240 s:\n{log.decode()[-3000:]}")
    assert proc.returncode == 0, log.decode()[-3000:]

    expected, got = read(local), read(out)
    assert set(got) == set(expected) and len(got) == 50
    for rid, r in got.items():
        assert list(r) == list(expected[rid])  # the same form, field by field
        assert (r["answer"], r["prompt_tokens"], r["completion_tokens"], r["finish_reason"], r["error"]) == \
            (expected[rid]["answer"], expected[rid]["prompt_tokens"], expected[rid]["completion_tokens"],
             expected[rid]["finish_reason"], expected[rid]["error"]), rid
    shards = sorted((tmp_path / "ray.jsonl.shards").glob("part-*.jsonl"))
    assert shards and sum(len(read(s)) for s in shards) == 50


def test_parquet_shards_merge_into_one_parquet_output(tmp_path):
    pa = _need_ray()
    from llavakit.batch.output import record
    from llavakit.batch.ray_job import _schema, _ShardWriter, merge_shards

    folder = tmp_path / "out.parquet.shards"
    writer = _ShardWriter(folder, "parquet")
    writer.write(pa.Table.from_pylist([record("a", "yes", 600, 3, "stop", 0.5)], schema=_schema()))
    writer.write(pa.Table.from_pylist([record("b", error="Could not decode 'b.png'")], schema=_schema()))
    assert _ShardWriter(folder, "parquet").next == 2  # a resumed job numbers on
    assert merge_shards(folder, tmp_path / "out.parquet") == 2
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["error"].startswith("Could not decode")
    assert rows[0] == record("a", "yes", 600, 3, "stop", 0.5)


def test_without_ray_the_job_says_what_to_install(tmp_path, monkeypatch, capsys):
    from llavakit.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    (tmp_path / "images").mkdir()
    assert main(["batch", "--ray", "--input", str(tmp_path / "images"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "pip install 'llavakit[ray]'" in capsys.readouterr().err


def test_a_bad_model_fails_before_ray_starts(tmp_path, capsys):
    _need_ray()
    from llavakit.cli import main

    (tmp_path / "images").mkdir()
    args = ["batch", "--ray", "--model", str(tmp_path / "nowhere"), "--input", str(tmp_path / "images"),
            "--output", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_resuming_a_local_output_on_ray_keeps_its_records(tmp_path):
    pa = _need_ray()
    from llavakit.batch.output import dumps, record
    from llavakit.batch.ray_job import _adopt_output, _done_ids, _schema, _ShardWriter, merge_shards

    out, folder = tmp_path / "out.jsonl", tmp_path / "out.jsonl.shards"
    out.write_text(dumps(record("a", "one", 590, 2, "stop", 0.1)) + dumps(record("b", "two", 590, 2, "stop", 0.1))
                   + '{"id": "c", "answ')  # a local job killed mid-line
    _ShardWriter(folder, "jsonl").write(pa.Table.from_pylist([record("b", "two", 590, 2, "stop", 0.1)],
                                                             schema=_schema()))
    _adopt_output(out, folder, "jsonl")
    assert _done_ids(folder, "jsonl") == {"a", "b"}
    assert merge_shards(folder, out) == 2
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == ["a", "b"]
