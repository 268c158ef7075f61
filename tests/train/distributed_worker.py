"""One process of a torchrun launch that runs `llavakit train` several times (tests/train/test_distributed.py).

    torchrun --nproc-per-node 2 ... tests/train/distributed_worker.py JOBS.json PORT

JOBS.json holds a list of argument lists for `llavakit`. The first run starts and ends its process group
from torchrun's variables, as `torchrun -m llavakit train` does. torchrun's rendezvous store cannot
host a second default group, so the later runs share one started here on 127.0.0.1:PORT (`train` uses
a group it finds running and leaves it running). One launch for all the runs: starting processes that
import torch is most of a run's time on a small CPU.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from llavakit.cli import main


def run(jobs: list[list[str]], port: int) -> None:
    """Run every job; raise on the first that does not exit 0."""
    first, *rest = jobs
    if main(first) != 0:
        raise SystemExit(f"rank {os.environ['RANK']}: {first} failed")
    if not rest:
        return
    rank, size, timeout = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timedelta(seconds=60)
    # A store of its own: under torchrun a tcp:// init method expects torchrun's agent to host it.
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    try:
        for argv in rest:
            if main(argv) != 0:
                raise SystemExit(f"rank {os.environ['RANK']}: {argv} failed")
        # Both ranks get here before either leaves: rank 0 hosts the store, and a rank 1 still talking
        # to it as rank 0 exited was seen to abort at exit ("terminate called without an active
        # exception") after every job had passed. Not on failure: the other rank may never come.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f), int(sys.argv[2]))
