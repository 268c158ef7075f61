"""Rank 0 of a tensor-parallel model: the process the public API, the engine and the server talk to.

Rank 0 runs everything a one-process model runs (scheduler, caches, sampling); the other ranks run
only the model's forward passes, in step with it. Three of the model's calls need every rank, since
their layers are split; `attach` makes each of them send its inputs first:

    model.encode_tiles(pixels, ...)    ENCODE  (when the tower is split; else rank 0 runs it alone)
    embed_tokens(ids)                  EMBED
    model.decode(embeds, ..., cache)   DECODE  (the cache as slot indices: each rank has its own pool)

    rank 0:  send(command, inputs) ─► forward (all-reduce ... gather) ─► logits ─► sampling
    rank k:  receive()             ─► forward (all-reduce ... gather)

A command and its forward hold one lock, so commands never interleave. When no command has gone
out for HEARTBEAT_S, a ping (with an all-reduce every rank must answer) keeps the other ranks from
timing out and finds a rank that died or hangs. A failure (a dead rank, a timeout, rank 0
interrupted inside a forward) is final: every later call raises ParallelError, and `on_failure`
is told once.
"""

from __future__ import annotations

import atexit
import inspect
import itertools
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Callable

import torch

from ..errors import LlavakitError, ParallelError
from . import channel
from .channel import DECODE, EMBED, ENCODE, FREE, PING, STOP
from .comm import Comm
from .shard import Split

HEARTBEAT_S = 5.0  # a ping after this long without a command
MONITOR_S = 0.5  # how often rank 0 looks at the processes it started
STOP_WAIT_S = 10.0  # how long close() lets the other ranks end before killing them


def describe_exit(code: int) -> str:
    """'was killed by SIGKILL' / 'exited with status 2' for a Popen return code."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Driver:
    """Rank 0's side of a tensor-parallel group: sends the commands, watches the other ranks, stops them.

    workers: the processes of ranks 1..N-1 when llavakit started them (empty under torchrun).
    on_failure: called once, from whichever thread noticed, with a one-line reason; the default
    prints it to stderr. The command line sets one that also stops the program.
    """

    def __init__(self, comm: Comm, split: Split, workers: list[subprocess.Popen], restore_threads: int | None = None):
        self.comm, self.split, self.workers = comm, split, workers
        self.lock = threading.RLock()
        self.depth = 0  # commands in progress on this thread: only the outermost one is sent
        self.failed: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self.parameters = 0  # the whole model's, for VLM.info() (set by launch.py)
        self._fail_lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._restore_threads = restore_threads
        self._pools: dict[int, int] = {}  # id(rank 0's per-layer key list) -> pool number on the other ranks
        self._freed: deque[int] = deque()  # pool numbers whose engine is gone, to free on the other ranks
        self._numbers = itertools.count()
        self._threads = [threading.Thread(target=self._heartbeat, name="llavakit-tp-heartbeat", daemon=True)]
        if workers:
            self._threads.append(threading.Thread(target=self._monitor, name="llavakit-tp-monitor", daemon=True))
        for t in self._threads:
            t.start()
        atexit.register(self.close)

    # -- the model's calls ----------------------------------------------------------------------------------
    def attach(self, model) -> None:
        """Make rank 0's model send ENCODE, EMBED and DECODE before the calls that need every rank."""
        encode, decode, embed = model.encode_tiles, model.decode, model.language_model.embed_tokens.forward
        signature = inspect.signature(encode)

        def encode_tiles(*args, **kwargs) -> torch.Tensor:
            # The options after the pixels (chunk size, NeXT-Video's pooling) travel as numbers, in order.
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            pixels, *options = bound.arguments.values()
            return self._run(ENCODE, [int(x) for x in options], [pixels], lambda: encode(*args, **kwargs))

        def decode_call(embeds, positions, valid, cache, last_only):
            numbers, tensors = self._decode_message(embeds, positions, valid, cache, last_only)
            return self._run(DECODE, numbers, tensors, lambda: decode(embeds, positions, valid, cache, last_only))

        if self.split.plan.vision_split:  # else the tower and projector are rank 0's alone: no command
            model.encode_tiles = encode_tiles
        model.decode = decode_call
        model.language_model.embed_tokens.forward = lambda ids: self._run(EMBED, [], [ids], lambda: embed(ids))

    def _decode_message(self, embeds, positions, valid, cache, last_only) -> tuple[list[int], list[torch.Tensor]]:
        tensors = [embeds, positions]
        numbers = [int(cache is not None), 0, 0, 0, 0, int(last_only), int(valid is not None)]
        if cache is not None:
            numbers[1:5] = [self._pool(cache.keys), cache.keys[0].shape[0], int(cache.plain_causal), int(cache.padded)]
            tensors += [cache.write_slots, cache.read_slots, cache.read_valid, cache.query_pos]
        if valid is not None:
            tensors.append(valid)
        return numbers, tensors

    def _pool(self, keys: list) -> int:
        """The number the other ranks know rank 0's key/value pool by; a new one for a new engine."""
        number = self._pools.get(id(keys))
        if number is None:
            number = self._pools[id(keys)] = next(self._numbers)
            try:  # the engine's pool list is weakly referenceable: its ranks' pools go when it goes
                weakref.finalize(keys, self._forget, id(keys), number)
            except TypeError:  # a plain list (a hand-made PagedStep): kept as long as the model
                pass
        return number

    def _forget(self, key: int, number: int) -> None:
        self._pools.pop(key, None)
        self._freed.append(number)

    def _run(self, command: int, numbers: list[int], tensors: list[torch.Tensor], call: Callable):
        """Send the command (unless one is in progress on this thread) and run `call` under the lock."""
        with self.lock:
            if self.failed is not None:
                raise ParallelError(f"{self.failed}; this model cannot run any more: load it again.")
            self.depth += 1
            try:
                if self.depth == 1:
                    if self._freed:  # appended by the garbage collector, from any thread: popped one by one
                        freed = [self._freed.popleft() for _ in range(min(40, len(self._freed)))]
                        channel.send(self.comm, FREE, freed)
                    channel.send(self.comm, command, numbers, tensors)
                return call()
            except ParallelError as e:
                self._fail(str(e))
                raise
            except (LlavakitError, ValueError):
                raise  # bad input: every rank raised the same before any collective, and goes on
            except BaseException as e:
                # Interrupted (a second Ctrl-C) or failed in the middle of a forward: the other ranks may
                # be waiting inside it, so the ranks are out of step for good.
                self._fail(f"rank 0 stopped inside a forward pass ({type(e).__name__}); the ranks are out of step")
                raise
            finally:
                self.depth -= 1
                self._last = time.monotonic()

    # -- watching ---------------------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        with self._fail_lock:
            if self.failed is not None:
                return
            self.failed = reason
        for p in self.workers:  # the others can do nothing more; do not leave them waiting
            if p.poll() is None:
                p.kill()
        (self.on_failure or _print_failure)(reason)

    def _heartbeat(self) -> None:
        while not self._closed.wait(1.0):
            if self.failed is not None:
                return
            if time.monotonic() - self._last < HEARTBEAT_S or not self.lock.acquire(timeout=0.2):
                continue
            try:
                if self.failed is None and not self._closed.is_set():
                    channel.send(self.comm, PING)
                    self.comm.ping()
                    self._last = time.monotonic()
            except ParallelError as e:
                self._fail(str(e))
            finally:
                self.lock.release()

    def _monitor(self) -> None:
        while not self._closed.wait(MONITOR_S):
            for rank, p in enumerate(self.workers, start=1):
                code = p.poll()
                if code is not None and not self._closed.is_set():
                    self._fail(f"tensor-parallel rank {rank} (pid {p.pid}) {describe_exit(code)}")
                    return

    # -- the end ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the other ranks (a STOP command; killed if they do not end within STOP_WAIT_S). Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        atexit.unregister(self.close)
        if self.failed is None and self.lock.acquire(timeout=STOP_WAIT_S):
            try:
                channel.send(self.comm, STOP)
            except ParallelError:
                pass
            finally:
                self.lock.release()
        deadline = time.monotonic() + STOP_WAIT_S
        for p in self.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdin is not None:
                p.stdin.close()
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)


def _print_failure(reason: str) -> None:
    print(f"llavakit: {reason}; this model cannot run any more: load it again.", file=sys.stderr, flush=True)
