"""Real ranks: `llavakit.load(tensor_parallel_size=2)` and `llavakit serve --tensor-parallel-size 2` start
processes; they answer as one process does, a killed rank is noticed at once, and no rank outlives
the program (SIGTERM, SIGKILL of rank 0, or of another rank). Every wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import llavakit
from llavakit.errors import ParallelError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))
from server_helpers import Server, image_message, local_message, png_bytes  # noqa: E402

NOTICE_S = 60  # the longest a dead rank may go unnoticed


def _conv(text: str, seed: int | None = None) -> list[dict]:
    parts = []
    if seed is not None:
        im = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8))
        parts.append({"type": "image", "image": im})
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _workers_of(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children() if "llavakit.parallel.entry" in " ".join(c.cmdline())]


def test_load_starts_a_rank_that_answers_and_a_killed_rank_is_noticed(models, checkpoint, capfd):
    one = models("llama")[0]
    started = time.monotonic()
    vlm = llavakit.load(checkpoint("llama"), dtype=torch.float32, tensor_parallel_size=2)
    try:
        lines = capfd.readouterr().err.splitlines()
        assert ("[llavakit] tensor parallel over 2 ranks (cpu, gloo, 1 thread each); vision tower and projector "
                "split") in lines
        per_rank = [line for line in lines if line.startswith("[llavakit]   rank ")]
        assert [line.split(":")[0] for line in per_rank] == ["[llavakit]   rank 0", "[llavakit]   rank 1"]
        assert all("KV cache 256 B per token, 65,536 tokens at the default budget" in line for line in per_rank)
        (worker,) = vlm.parallel.workers
        convs = [_conv("What is in the picture?", 1), _conv("How many people are there?"), _conv("Describe it.", 2)]
        params = llavakit.SamplingParams(max_new_tokens=8, ignore_eos=True)
        assert [o.token_ids for o in vlm.generate(convs, params)] == [o.token_ids for o in one.generate(convs, params)]

        reasons = []
        vlm.parallel.on_failure = reasons.append
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not reasons and time.monotonic() - killed < NOTICE_S:
            time.sleep(0.05)
        assert reasons == [f"tensor-parallel rank 1 (pid {worker.pid}) was killed by SIGKILL"]
        assert time.monotonic() - killed < 5  # rank 0 watches the processes it started
        with pytest.raises(ParallelError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL; this model cannot run any "
                                                "more: load it again"):
            vlm.chat(convs[0], max_new_tokens=2)
    finally:
        vlm.close()
    assert time.monotonic() - started < 120


def test_rank_0_killed_takes_its_ranks_with_it(checkpoint, tmp_path):
    code = ("import sys, llavakit; vlm = llavakit.load(sys.argv[1], dtype='float32', tensor_parallel_size=2); "
            "print(vlm.parallel.workers[0].pid, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(checkpoint("llama"))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()  # bounded: the process exits (EOF) if loading fails
        assert line.strip().isdigit(), line
        worker = int(line)
        proc.kill()
        assert _gone(worker, 10), "rank 1 outlived rank 0"
    finally:
        proc.kill()
        proc.wait(10)


def _ask(server: Server, text: str, seed: int, out: dict) -> None:
    body = {"model": "tp", "messages": image_message(text, png_bytes(24 + seed, 20 + 2 * seed)), "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    status, reply, _ = server.post(body)
    out[seed] = (status, reply)


def test_server_on_two_ranks_answers_concurrently_and_sigterm_ends_every_rank(checkpoint, tmp_path):
    server = Server(checkpoint("llama"), "tp", ["--tensor-parallel-size", "2"], tmp_path / "server.log")
    try:
        (worker,) = _workers_of(server.proc.pid)
        answers: dict = {}
        threads = [threading.Thread(target=_ask, args=(server, f"Question {i}: what is in the picture?", i, answers))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        one = llavakit.load(checkpoint("llama"), dtype=torch.float32)
        for i in range(4):
            status, reply = answers[i]
            assert status == 200, reply
            want = one.chat(local_message(f"Question {i}: what is in the picture?", png_bytes(24 + i, 20 + 2 * i)),
                            sampling=llavakit.SamplingParams(max_new_tokens=8, ignore_eos=True))
            assert reply["choices"][0]["message"]["content"] == want.text
        assert server.stop(60) == 0, server.log_tail()
        assert _gone(worker, 10), "rank 1 outlived the server"
    finally:
        server.proc.kill()


def test_the_command_line_stops_with_one_line_when_a_rank_dies(monkeypatch, capsys):
    """`llavakit serve` (chat, batch, eval) print one line and stop themselves: a server drains on SIGTERM."""
    from llavakit import cli

    class Parallel:
        on_failure = None

    class Vlm:
        parallel = Parallel()

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    vlm = Vlm()
    cli._stop_on_rank_failure(vlm)
    vlm.parallel.on_failure("tensor-parallel rank 1 (pid 123) was killed by SIGKILL")
    assert capsys.readouterr().err == "error: tensor-parallel rank 1 (pid 123) was killed by SIGKILL; stopping.\n"
    assert sent == [(os.getpid(), signal.SIGTERM)]
