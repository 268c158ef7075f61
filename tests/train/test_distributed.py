"""Training on two processes (torchrun, gloo, 127.0.0.1, one thread each) against one process.

One torchrun launch runs three trainings (tests/train/distributed_worker.py), each 2 ranks × --batch-size 2;
meanwhile this process trains the same runs with 1 rank × --batch-size 4. Same seed, so the same
examples in each global batch: the losses agree within 1e-4 (relative) and the weights within 1e-5.

    ddp          stage full, with --eval-data (the evaluation is shared by the ranks)
    lora         stage lora with --gradient-checkpointing (the adapters train under DDP)
    fsdp-resume  --fsdp (FSDP2 shards the model), resumed from the ddp run's checkpoint-2: the saved
                 optimizer state is sharded on load, the final one gathered whole; --eval-data

Then one process resumes the two-process checkpoint with --batch-size 4 (the same global batch) to the
same weights, and refuses --batch-size 2 (another global batch).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llavakit.cli import main
from llavakit.errors import ConfigError
from llavakit.train.assemble import init_checkpoint
from llavakit.train.loop import TrainConfig, TrainError, train

from tiny_training import COLORS, TEXT, VISION, write_records

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150


def _write_data(folder: Path, n: int = 12) -> Path:
    """Pictures of one colour and their colour; every fourth record is text only, so that some
    micro-batches leave the projector out (DDP must allow parameters unused on one rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLORS)[i % 3]
        if i % 4 == 3:
            lines.append({"id": str(i), "conversations": [
                {"from": "human", "value": f"Say {name}."}, {"from": "gpt", "value": name}]})
            continue
        Image.new("RGB", (32 + 8 * (i % 2), 32), COLORS[name]).save(folder / f"{i}.png")
        lines.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": name}]})
    return write_records(folder, lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(*_):
    pass


def _weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst


def _assert_same_loss(got: float, want: float) -> None:
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)


ARGS = dict(stage="full", max_steps=3, lr=1e-3, save_every=2, seed=4)


def _cli(model: Path, data: Path, out: Path, cfg: dict, *extra: str) -> list[str]:
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2"]
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + list(extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four two-process runs (started first, in the background) and their one-process references."""
    root = tmp_path_factory.mktemp("dist")
    data = _write_data(root / "data")
    model = init_checkpoint(root / "init", "llava_onevision", VISION, TEXT, corpus=[data], vocab_size=300, seed=0)
    two = root / "two"
    lora = dict(ARGS, stage="lora", lora_r=4, lora_alpha=8, lr=5e-3)
    jobs = [
        _cli(model, data, two / "ddp", ARGS, "--eval-data", str(data)),
        _cli(model, data, two / "lora", lora, "--gradient-checkpointing"),
        _cli(model, data, two / "fsdp-resume", ARGS, "--fsdp", "--resume", str(two / "ddp" / "checkpoint-2"),
             "--eval-data", str(data)),
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(ROOT / "tests" / "train" / "distributed_worker.py"),
           str(root / "jobs.json"), str(_free_port())]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    threads = torch.get_num_threads()
    try:
        one = root / "one"
        torch.set_num_threads(1)  # two cores: one for each rank, and this process takes turns with them
        ref = {
            "full": train(model, data, one / "full", TrainConfig(batch_size=4, **ARGS), eval_data=data, log=_quiet,
                          progress=False),
            "lora": train(model, data, one / "lora", TrainConfig(batch_size=4, gradient_checkpointing=True, **lora),
                          log=_quiet, progress=False),
        }
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: nothing outlives the test
        proc.communicate()
        raise
    finally:
        torch.set_num_threads(threads)
    assert proc.returncode == 0, err[-4000:]
    return dict(root=root, model=model, data=data, two=two, one=one, ref=ref, stdout=out, stderr=err)


def _summary(folder: Path) -> dict:
    return json.loads((folder / "train_summary.json").read_text())


def test_two_ranks_of_batch_2_equal_one_rank_of_batch_4(runs):
    two, one, ref = runs["two"], runs["one"], runs["ref"]["full"]
    got = _summary(two / "ddp")
    assert got["world_size"] == 2 and got["steps"] == ref["steps"] == 3 and got["samples"] == ref["samples"] == 12
    for key in ("first_loss", "final_loss", "eval_loss"):
        _assert_same_loss(got[key], ref[key])
    _assert_same_weights(_weights(two / "ddp"), _weights(one / "full"))
    _assert_same_weights(_weights(two / "ddp" / "checkpoint-2"), _weights(one / "full" / "checkpoint-2"))
    # Rank 0 alone writes: the same files as one process, one summary printed and one log per run.
    assert sorted(p.name for p in (two / "ddp").iterdir()) == sorted(p.name for p in (one / "full").iterdir())
    assert runs["stdout"].count('"world_size": 2') == 3
    assert runs["stderr"].count("[llavakit] stage full: ") == 2 and runs["stderr"].count("[llavakit] stage lora: ") == 1
    assert "3 steps of 4 conversations (2 processes × 2 × 1)" in runs["stderr"]


def test_fsdp_resumes_a_ddp_checkpoint_and_saves_whole_states(runs):
    two, one, ref = runs["two"], runs["one"], runs["ref"]["full"]
    got = _summary(two / "fsdp-resume")
    assert got["steps"] == 3 and got["world_size"] == 2
    _assert_same_loss(got["final_loss"], ref["final_loss"])
    _assert_same_loss(got["eval_loss"], ref["eval_loss"])  # FSDP's forward passes, shared by the ranks
    _assert_same_weights(_weights(two / "fsdp-resume"), _weights(one / "full"))
    # The optimizer state is gathered whole, in the layout of an unsharded run.
    a = torch.load(two / "fsdp-resume" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(one / "full" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert a[i]["step"] == b[i]["step"] == 3
        for moment in ("exp_avg", "exp_avg_sq"):
            assert a[i][moment].shape == b[i][moment].shape
            assert float((a[i][moment] - b[i][moment]).abs().max()) <= 1e-6


def test_lora_with_gradient_checkpointing_on_two_ranks(runs):
    two, one, ref = runs["two"], runs["one"], runs["ref"]["lora"]
    got = _summary(two / "lora")
    for key in ("first_loss", "final_loss"):
        _assert_same_loss(got[key], ref[key])
    name = "adapter_model.safetensors"
    _assert_same_weights(_weights(two / "lora", name), _weights(one / "lora", name))


def test_resume_on_one_rank_needs_the_same_global_batch(runs):
    model, data, two, one = runs["model"], runs["data"], runs["two"], runs["one"]
    start = two / "ddp" / "checkpoint-2"
    with pytest.raises(TrainError) as e:
        train(model, data, one / "refused", TrainConfig(batch_size=2, **ARGS), resume=start, log=_quiet,
              progress=False)
    assert str(e.value) == (
        f"--resume: {start} was made with a global batch of 4 conversations (--batch-size 2 × --grad-accum 1 × "
        "2 process(es)); this run's is 2 (--batch-size 2 × --grad-accum 1 × 1 process(es)). A run resumes with "
        "the same global batch: pass --batch-size 4.")
    assert not (one / "refused").exists()
    # The same global batch split otherwise: 1 rank × 2 conversations × 2 micro-batches.
    summary = train(model, data, one / "resumed", TrainConfig(batch_size=2, grad_accum=2, **ARGS), resume=start,
                    log=_quiet, progress=False)
    assert summary["steps"] == 3 and summary["world_size"] == 1
    _assert_same_weights(_weights(one / "resumed"), _weights(one / "full"))


def test_fsdp_needs_torchrun_and_stage_full(runs, capsys):
    model, data, root = runs["model"], runs["data"], runs["root"]
    assert main(_cli(model, data, root / "x", dict(max_steps=1), "--fsdp")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --fsdp shards the model across the processes of a torchrun launch; start the run with "
        "`torchrun --nproc-per-node N -m llavakit train ... --fsdp`, or drop --fsdp.")
    with pytest.raises(ConfigError, match=r"--fsdp shards full fine-tuning \(--stage full\); --stage lora"):
        train(model, data, root / "y", TrainConfig(stage="lora", max_steps=1), fsdp=True, log=_quiet, progress=False)
    assert not (root / "x").exists() and not (root / "y").exists()
