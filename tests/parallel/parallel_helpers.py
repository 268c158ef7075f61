"""Tensor-parallel ranks as threads of the test process, for fast parity tests.

`llavakit.load(tensor_parallel_size=N)` starts N-1 processes (a torch import and a load each); the
tests of what the ranks compute run the same code in threads instead: each rank loads its share
with launch.load_rank, the ranks meet on gloo at 127.0.0.1, rank 0 gets the real Driver and ranks
1..N-1 the real command loop (worker.serve_commands). Only the process start differs, and
test_processes.py checks that part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from llavakit.api import VLM, _eos_ids
from llavakit.config import LlavaConfig
from llavakit.parallel.comm import Comm, local_groups
from llavakit.parallel.driver import Driver
from llavakit.parallel.launch import load_rank, whole_parameters
from llavakit.parallel.plan import make_plan
from llavakit.parallel.shard import Split
from llavakit.parallel.worker import serve_commands
from llavakit.processing.processor import Processor
from llavakit.weights import read_raw_config

WAIT_S = 30  # every join and rendezvous here is bounded


@contextlib.contextmanager
def thread_ranks(folder: Path, size: int = 2, dtype: torch.dtype = torch.float32, quantize: str = "none",
                 plan_changes: dict | None = None):
    """A VLM whose model is split over `size` ranks, rank 0 in this thread and the others in threads."""
    cfg = LlavaConfig.from_hf(read_raw_config(folder))
    plan = make_plan(cfg, size, size, "ranks")
    if plan_changes:
        plan = dataclasses.replace(plan, **plan_changes)
    timeout = timedelta(seconds=WAIT_S)
    device = torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
    splits = [Split(plan, rank) for rank in range(size)]
    comms = [Comm(rank, size, device) for rank in range(size)]
    models = [load_rank(folder, cfg, dtype, device, quantize, s, c) for s, c in zip(splits, comms)]
    # A gloo group's constructor waits for its peers holding the GIL, so one process cannot build two of
    # them at once; connecting lazily (on the first collective, which releases it) lets threads be ranks.
    lazy = os.environ.get("TORCH_GLOO_LAZY_INIT")
    os.environ["TORCH_GLOO_LAZY_INIT"] = "1"
    try:
        for rank, comm in enumerate(comms):
            comm.connect(*local_groups(store, rank, size, device, timeout))
    finally:
        if lazy is None:
            del os.environ["TORCH_GLOO_LAZY_INIT"]
        else:
            os.environ["TORCH_GLOO_LAZY_INIT"] = lazy
    failures: list[BaseException] = []

    def serve(rank: int) -> None:
        try:
            serve_commands(models[rank], comms[rank])
        except BaseException as e:  # shown by the test that closes the group
            failures.append(e)

    workers = [threading.Thread(target=serve, args=(r,), daemon=True) for r in range(1, size)]
    for t in workers:
        t.start()
    driver = Driver(comms[0], splits[0], [])
    driver.attach(models[0])
    driver.parameters = whole_parameters(cfg)
    processor = Processor.load(folder, cfg)
    vlm = VLM(models[0], processor, cfg, folder, _eos_ids(folder, cfg, processor))
    vlm.parallel = driver
    try:
        yield vlm
    finally:
        driver.close()
        for t in workers:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in workers), "a rank did not stop"
        assert not failures, failures
