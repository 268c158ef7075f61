"""Rank 0's commands to the other ranks: a fixed-size header, then the command's tensors.

    header (int64, HEADER long, control group): command, #numbers, #tensors, numbers...,
                                                per tensor: dtype code, ndim, shape...
    payload (data group): the tensors, packed one flat buffer per dtype (bool travels with the int64s)

Packing keeps a decode step's message to three broadcasts (header, integers, embeddings) whatever
it holds; each broadcast costs about a collective's latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Comm

PING, STOP, FREE, ENCODE, EMBED, DECODE = range(1, 7)
NAMES = {PING: "ping", STOP: "stop", FREE: "free", ENCODE: "encode", EMBED: "embed", DECODE: "decode"}
HEADER = 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool)
_WIRE = {torch.bool: torch.int64}  # gloo moves no bool tensors; as int64 they join the other integers


@dataclass
class Message:
    """One command as received: its code, its numbers and its tensors (on the data group's device)."""

    command: int
    numbers: list[int]
    tensors: list[torch.Tensor]


def send(comm: Comm, command: int, numbers: list[int] = (), tensors: list[torch.Tensor] = ()) -> None:
    """Broadcast a command from rank 0 (every other rank is in `receive`)."""
    header = [command, len(numbers), len(tensors), *numbers]
    for t in tensors:
        header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(header) > HEADER:
        raise ValueError(f"a {NAMES[command]} command needs a {len(header)}-number header; HEADER is {HEADER}")
    comm.broadcast(torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.long), control=True)
    for _, flat in _pack(tensors, comm.device):
        if flat.numel():
            comm.broadcast(flat)


def receive(comm: Comm) -> Message:
    """Wait for rank 0's next command (at most the collective timeout) and its tensors."""
    header = torch.zeros(HEADER, dtype=torch.long)
    comm.broadcast(header, control=True)
    h = header.tolist()
    command, n_numbers, n_tensors = h[:3]
    numbers, at = h[3 : 3 + n_numbers], 3 + n_numbers
    specs = []
    for _ in range(n_tensors):
        dtype, ndim = _DTYPES[h[at]], h[at + 1]
        specs.append((dtype, tuple(h[at + 2 : at + 2 + ndim])))
        at += 2 + ndim
    tensors: list[torch.Tensor | None] = [None] * n_tensors
    for wire in dict.fromkeys(_WIRE.get(d, d) for d, _ in specs):  # the order _pack sends them in
        members = [i for i, (d, _) in enumerate(specs) if _WIRE.get(d, d) == wire]
        sizes = [_numel(specs[i][1]) for i in members]
        flat = torch.empty(sum(sizes), dtype=wire, device=comm.device)
        if flat.numel():  # both sides skip an empty buffer: the header says so
            comm.broadcast(flat)
        for i, part in zip(members, flat.split(sizes)):
            tensors[i] = part.view(specs[i][1]).to(specs[i][0])
    return Message(command, numbers, tensors)


def _pack(tensors, device) -> list[tuple[torch.dtype, torch.Tensor]]:
    """One flat buffer per wire dtype, in order of first appearance."""
    out = []
    for wire in dict.fromkeys(_WIRE.get(t.dtype, t.dtype) for t in tensors):
        parts = [t.reshape(-1).to(device=device, dtype=wire) for t in tensors if _WIRE.get(t.dtype, t.dtype) == wire]
        out.append((wire, torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
