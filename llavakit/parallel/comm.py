"""The collectives of one tensor-parallel rank, over torch.distributed process groups with timeouts.

Two groups: `control` (gloo, CPU tensors) carries rank 0's commands and heartbeats; `data` carries
the model's all-reduces, gathers and the commands' tensors: the same gloo group on CPUs, an NCCL
group on GPUs. Each collective waits at most `timeout`; a failure (a peer gone, a timeout) becomes
a ParallelError, so that nothing hangs and the caller can tell it from a model error.

Groups are built without the process-wide default group when llavakit starts the ranks itself, so
one process can drive several tensor-parallel models; under torchrun they are new groups of the
default one (`init_process_group`, env://).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ParallelError

DEFAULT_TIMEOUT_S = 60.0  # a collective's longest wait: ranks compute the same work in lockstep
TIMEOUT_ENV = "LLAVAKIT_TP_TIMEOUT"


def collective_timeout() -> timedelta:
    """The per-collective timeout: $LLAVAKIT_TP_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))


class Comm:
    """One rank's view of its group: rank, size, device, and the collectives the model needs."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device
        self.control = None  # set by connect()
        self.data = None

    def connect(self, control, data) -> None:
        """Use these process groups (ProcessGroup or backend objects with allreduce/broadcast/gather)."""
        self.control, self.data = control, data

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo and NCCL raise RuntimeError subclasses (DistBackendError, ...)
            raise ParallelError(f"tensor-parallel {what} failed on rank {self.rank}: {_first_line(e)}") from e

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` (contiguous) over the ranks, in place."""
        self._wait(self.data.allreduce([tensor]), "all-reduce")

    def broadcast(self, tensor: torch.Tensor, control: bool = False) -> None:
        """Rank 0's `tensor` into every rank's (contiguous, same shape), in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait((self.control if control else self.data).broadcast([tensor], opts), "broadcast")

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape everywhere), in rank order, on rank 0; None elsewhere."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        parts = [[torch.empty_like(tensor) for _ in range(self.size)]] if self.rank == 0 else []
        self._wait(self.data.gather(parts, [tensor], opts), "gather")
        return parts[0] if self.rank == 0 else None

    def ping(self) -> None:
        """A one-number all-reduce on the control group: every rank must take part, so a rank that
        hangs is noticed (within the timeout) as well as one that died."""
        self._wait(self.control.allreduce([torch.zeros(1)]), "heartbeat")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def local_groups(store, rank: int, size: int, device: torch.device, timeout: timedelta):
    """(control, data) groups of ranks on this machine, rendezvousing through `store`, bound to 127.0.0.1."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    control = dist.ProcessGroupGloo(dist.PrefixStore("llavakit-tp/gloo", store), rank, size, opts)
    if device.type != "cuda":
        return control, control
    nccl = dist.ProcessGroupNCCL.Options()
    nccl._timeout = timeout
    return control, dist.ProcessGroupNCCL(dist.PrefixStore("llavakit-tp/nccl", store), rank, size, nccl)


def torchrun_groups(device: torch.device, timeout: timedelta, start_timeout: timedelta):
    """(control, data) groups under torchrun: the default group is made from the environment when the
    program has not made one (its rendezvous waits up to `start_timeout`), then two new groups."""
    if not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=start_timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    data = control if device.type != "cuda" else dist.new_group(backend="nccl", timeout=timeout)
    return control, data
