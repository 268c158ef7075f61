"""Ranks 1..N-1: load this rank's share, then run rank 0's commands until it stops them.

`python -m llavakit.parallel.entry` is what rank 0 starts for each of them on one machine (the
spec arrives in $LLAVAKIT_TP_SPEC); under torchrun the same loop runs inside `llavakit.load`.

A worker never outlives rank 0: it reads its stdin, a pipe rank 0 holds open, and exits when the
pipe closes or it is handed to another parent; a command that does not come within the collective
timeout (rank 0 pings every few seconds) ends it too. It ignores SIGINT and SIGTERM, which a
terminal (Ctrl-C) or a service manager sends to every process of the group: rank 0 decides, and
stops it with a command (or by exiting). SIGKILL still ends it, and rank 0 reports that.
"""

from __future__ import annotations

import os
import select
import sys
import threading

import torch

from ..errors import LlavakitError, ParallelError
from ..model.text import PagedStep
from . import channel
from .channel import DECODE, EMBED, ENCODE, FREE, PING, STOP
from .comm import Comm

SPEC_ENV = "LLAVAKIT_TP_SPEC"


def serve_commands(model, comm: Comm) -> None:
    """Run rank 0's commands on this rank's `model` until STOP. Raises ParallelError when rank 0 is
    gone or a collective fails."""
    pools: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    with torch.inference_mode():
        while True:
            msg = channel.receive(comm)
            if msg.command == STOP:
                return
            if msg.command == PING:
                comm.ping()
                continue
            if msg.command == FREE:
                for number in msg.numbers:
                    pools.pop(number, None)
                continue
            try:
                if msg.command == ENCODE:
                    model.encode_tiles(msg.tensors[0], *msg.numbers)
                elif msg.command == EMBED:
                    model.language_model.embed_tokens(msg.tensors[0])
                elif msg.command == DECODE:
                    _decode(model, msg, pools)
            except ParallelError:
                raise
            except (LlavakitError, ValueError):
                pass  # bad input: rank 0 raised the same, before any collective, and tells its caller


def _decode(model, msg: channel.Message, pools: dict) -> None:
    has_cache, number, slots, plain_causal, padded, last_only, has_valid = msg.numbers
    embeds, positions, *rest = msg.tensors
    cache = None
    if has_cache:
        write, read, read_valid, query_pos = rest[:4]
        rest = rest[4:]
        keys, values = _pool(model, pools, number, slots)
        cache = PagedStep(keys=keys, values=values, write_slots=write, read_slots=read, read_valid=read_valid,
                          query_pos=query_pos, plain_causal=bool(plain_causal), padded=bool(padded))
    model.decode(embeds, positions, rest[0] if has_valid else None, cache, bool(last_only))


def _pool(model, pools: dict, number: int, slots: int):
    """This rank's key/value pool matching rank 0's pool `number`, grown to `slots` slots (zeroed, as the
    engine's: padded reads land on real slots, and garbage there could be NaN)."""
    from ..engine.runner import cache_heads

    if number not in pools:
        pools[number] = ([], [])
        text = model.cfg.text
        for buffers in pools[number]:
            buffers.extend(torch.zeros((0, cache_heads(model), text.head_dim), dtype=model.dtype, device=model.device)
                           for _ in range(text.num_layers))
    keys, values = pools[number]
    add = slots - keys[0].shape[0]
    if add > 0:
        for buffers in (keys, values):
            for i, old in enumerate(buffers):
                buffers[i] = torch.cat([old, old.new_zeros((add, *old.shape[1:]))])
    return keys, values


def watch_parent(parent: int) -> None:
    """End this process when rank 0 is gone: stdin (a pipe only rank 0 writes to) closes, or this
    process is handed to another parent. A daemon thread; returns at once."""
    def watch() -> None:
        while os.getppid() == parent:
            try:
                ready, _, _ = select.select([sys.stdin], [], [], 1.0)
                if ready and not os.read(sys.stdin.fileno(), 1 << 12):
                    break  # end of file: rank 0 exited, whichever way
            except (OSError, ValueError):
                break
        os._exit(1)

    threading.Thread(target=watch, name="llavakit-tp-parent", daemon=True).start()
