"""Training on many processes: the process group, how a global batch is shared, DDP or FSDP2, full states.

    torchrun --nproc-per-node N [--nnodes M ...] -m llavakit train ...   (RANK, WORLD_SIZE, LOCAL_RANK set)
        │
        ▼
    start(): the process group (gloo on CPUs, NCCL on GPUs; each process takes the GPU of its LOCAL_RANK)
        │
        ▼
    every step: the same global batch on every rank (batch_size × grad_accum × world records of the
    epoch's order); rank r takes the r-th contiguous share ─► its micro-batches ─► wrap(): DDP, or
    FSDP2 `fully_shard` per decoder layer with --fsdp ─► gradients averaged over the ranks

The loss is the mean over every target token of the global batch: the target count is summed over
the ranks before the backward pass, and each rank's loss is scaled by world / targets, so that DDP's
(and FSDP's) averaging of gradients over the ranks yields the gradient of that mean. The same seed
gives the same examples in each global batch whatever the world size, hence (up to float summation
order) the same losses and weights.

With one process and no torchrun, nothing here talks to anyone: every helper is a no-op and the
model is not wrapped.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from ..errors import ConfigError, LlavakitError

# A rank stuck in a collective (a peer died, or sits in a long save) fails after this long instead of
# hanging forever; rank 0 writing a 100+ GB checkpoint while the others wait must fit inside it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False  # this run started the process group, and ends it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and the summary."""
        return self.rank == 0


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank: the process group's if one is running, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def start(device: str, fsdp: bool = False) -> tuple[World, str]:
    """Join (or start) the process group of a torchrun launch; returns this process's World and its device.

    A process group already running (started by the caller) is used as it is and left running. Under
    torchrun with WORLD_SIZE > 1 (or with --fsdp, which needs one even alone) a group is started here
    from torchrun's variables, gloo for CPUs and NCCL for GPUs, and `stop` ends it. "cuda" becomes the
    GPU of the process's LOCAL_RANK; naming a GPU (cuda:1) is refused with several processes.
    """
    import torch.distributed as dist

    running = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if running else int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if not running and not (launched() and (size > 1 or fsdp)):
        if fsdp:
            raise ConfigError("--fsdp shards the model across the processes of a torchrun launch; start the run "
                              "with `torchrun --nproc-per-node N -m llavakit train ... --fsdp`, or drop --fsdp.")
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None and size > 1:
            raise ConfigError(f"--device {device}: with {size} processes each one takes the GPU of its LOCAL_RANK; "
                              "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs).")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not running:
        dist.init_process_group("nccl" if kind.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, owned=not running), device


def stop(world: World) -> None:
    """End the process group if `start` began it."""
    if world.owned:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (nothing alone)."""
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(world: World, values: list[float], device: str | torch.device = "cpu") -> list[float]:
    """The element-wise sum of `values` over every rank (float64, so counts stay exact)."""
    if world.size == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(world: World, obj) -> list:
    """Every rank's `obj` (small and picklable), in rank order."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def together(world: World, check) -> None:
    """Run `check()` on every rank and raise, on every rank, the first LlavakitError any of them raised.

    For the checks before training (the output folder, the checkpoint to resume): were one rank to stop
    alone, the others would wait for it in their next collective until the timeout.
    """
    error = None
    try:
        check()
    except LlavakitError as e:
        error = e
    found = [e for e in gather(world, error) if e is not None]
    if found:
        raise found[0]


def share(picked: list, world: World) -> list:
    """This rank's contiguous share of a global batch (`picked` holds world × an equal share)."""
    n = len(picked) // world.size
    return picked[world.rank * n:(world.rank + 1) * n]


# -- wrapping ------------------------------------------------------------------------------------------
def shard_layers(model: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: the decoder layers, which every forward pass runs once each.

    The tower stays in the root unit, gathered for the whole forward pass: how often its layers run
    depends on each rank's media (not at all for text, once per 16 tiles), and FSDP's collectives must
    come in the same order on every rank.
    """
    return list(model.language_model.layers)


# Parameters some batches leave out (no pictures: no tower, projector or newline). With FSDP every rank
# must have a gradient for the same parameters (it reduce-scatters those it has), so the Objective
# touches these with weight 0; under DDP, find_unused_parameters takes care of them.
MAYBE_UNUSED = ("vision_tower.", "multi_modal_projector.", "image_newline")


def wrap(objective: nn.Module, model: nn.Module, world: World, fsdp: bool, device: str) -> nn.Module:
    """`objective` (an nn.Module computing the loss of a batch with `model`) made data-parallel.

    DDP keeps a whole model per rank and all-reduces gradients. With `fsdp`, FSDP2 shards each decoder
    layer and the rest of the model over the ranks (parameters become DTensors: build the optimizer
    after this; the objective must touch MAYBE_UNUSED). One process without fsdp: `objective` itself.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(torch.device(device).type, (world.size,))
        for layer in shard_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(objective, mesh=mesh)  # the root: embeddings, tower, projector, norms, head
        return objective
    if world.size == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (rotary frequencies) never change: no broadcast before every forward (which would also make
    # the evaluation's forward passes collective). Unused parameters (a batch without pictures leaves the
    # projector out) get no gradient, as in one process: DDP notes them, at the cost of a graph walk per
    # step and of a warning at the first step when there happen to be none.
    return DistributedDataParallel(objective, find_unused_parameters=True, forward_sync_buffers=False)


def gradient_sync(wrapped: nn.Module, sync: bool):
    """A context in which backward passes accumulate gradients locally (`sync` False) or average them
    over the ranks (`sync` True: the last micro-batch of a step)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients to a total norm of at most `max_norm`; returns the norm before (sharded or not)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP: each rank holds part of the sum of squares
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# -- full states of a sharded model ---------------------------------------------------------------------
def full_tensors(world: World, tensors: dict) -> dict:
    """`tensors` with every DTensor gathered whole, on the CPU, on rank 0 (an empty dict elsewhere).

    Collective: every rank calls it with the same keys in the same order. One tensor is whole at a time.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for key, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if world.main:
            out[key] = t.detach().cpu() if torch.is_tensor(t) else t
    return out


def full_optimizer_state(world: World, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with sharded moments gathered whole (rank 0; elsewhere the local one).

    The result has the layout of an unsharded run's, so a checkpoint resumes with or without --fsdp.
    """
    state = opt.state_dict()
    whole = {i: full_tensors(world, s) for i, s in state["state"].items()}
    return {**state, "state": whole} if world.main else state


def shard_optimizer_state(state: dict, opt: torch.optim.Optimizer) -> dict:
    """An unsharded optimizer state_dict made to fit `opt`'s sharded parameters (for load_state_dict).

    Every rank holds the whole state and keeps its own shard of each moment; no communication.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in opt.param_groups for p in group["params"]]
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            s = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                 if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v for k, v in s.items()}
        out[i] = s
    return {**state, "state": out}
