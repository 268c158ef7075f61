"""The scheduler: which requests run, and what each does this step. Pure Python, no torch.

    add ──► waiting ──admit──► running ──finish / abort──► gone (blocks back to the pool)
                     (a batch slot and blocks for the whole answer, prefix blocks shared)

Every step (`schedule`):
  1. drop aborted requests, returning their blocks;
  2. admit waiting requests, oldest first, while the batch has room and the block manager has blocks
     for their whole answer (prompt + max_new_tokens), reusing cached prefix blocks. A request whose
     next prefix block a running request is still prefilling waits for it instead of computing it a
     second time (requests about one image often arrive together);
  3. every running request whose prompt is in decodes one token; the others prefill up to
     `prefill_chunk` prompt tokens together, oldest first, so a long prompt costs the others one
     chunk of latency per step, not its whole prefill.

No preemption: admission reserves a request's whole answer, so a running request never runs out
of blocks and never has to be evicted and recomputed. The price is that admission is conservative
(an answer that stops early held blocks it never used); requests that do not fit wait.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError
from .blocks import BLOCK, BlockManager, BlockTable, blocks_for


@dataclass(eq=False)
class Seq:
    """One request as the engine tracks it.

    The scheduler reads its prompt, budget and block table; `state` (the request's RequestState),
    `media`, `embeds` and `slots` belong to the engine and the runner and are opaque here.
    """

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    table: BlockTable
    state: Any = None  # RequestState: sampled ids (`state.ids`), text, stop strings
    media: list = field(default_factory=list)  # the runner's Media, in prompt order
    aborted: bool = False
    embeds: Any = None  # the runner's: (1, prompt, D) embeddings while the prompt is prefilled in chunks
    slots: Any = None  # the runner's: (blocks * BLOCK,) pool slot of each position, made on first use

    @property
    def prefilled(self) -> bool:
        """Whether the whole prompt is in the pool (its first token was sampled in the same step)."""
        return self.table.length >= len(self.prompt)


@dataclass
class ScheduledStep:
    """What runs this step: decode rows, then prompt chunks."""

    decode: list[Seq]  # one new token each, in running order
    prefill: list[tuple[Seq, int]]  # (request, prompt tokens to prefill now), oldest first


class Scheduler:
    """Waiting and running requests, admission under the batch size and the block budget.

    Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, blocks: BlockManager, max_batch_size: int, prefill_chunk: int):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.by_id: dict[str, Seq] = {}
        self.prompt_tokens = 0  # prompt tokens of admitted requests
        self.prefix_hit_tokens = 0  # of those, tokens served from the prefix cache

    # -- requests ---------------------------------------------------------------------------------
    def check(self, request_id: str, tokens: int) -> None:
        """Raise GenerationError when the id is in use, or `tokens` (prompt + answer) could never fit the budget."""
        if request_id in self.by_id:
            raise GenerationError(f"request id {request_id!r} is already in use.")
        need = blocks_for(tokens)
        if need > self.blocks.max_blocks:
            raise GenerationError(
                f"the request needs {need * BLOCK} tokens of KV cache but the engine holds "
                f"{self.blocks.max_blocks * BLOCK}; lower max_new_tokens or give the engine a larger kv_cache_bytes."
            )

    def add(self, seq: Seq) -> None:
        """Queue a request (`check` first). Raises GenerationError when it can never run."""
        self.check(seq.request_id, len(seq.prompt) + seq.max_new_tokens)
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request (False if unknown); a running one keeps its blocks until the next `schedule`,
        since the model may be reading them right now."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return False
        seq.aborted = True
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        return True

    def finish(self, seq: Seq) -> None:
        """A running request is done: it leaves the batch and its blocks go back."""
        self.running.remove(seq)
        self.by_id.pop(seq.request_id, None)
        self.blocks.release(seq.table)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        """Reap aborted requests, admit waiting ones, and say who decodes and who prefills how much."""
        self.reap()
        self._admit()
        decode, prefill, budget = [], [], self.prefill_chunk
        for seq in self.running:  # every step, every request: `prefilled` written out (no call)
            left = len(seq.prompt) - seq.table.length
            if left <= 0:
                decode.append(seq)
            elif budget > 0:
                n = min(budget, left)
                prefill.append((seq, n))
                budget -= n
        return ScheduledStep(decode, prefill)

    def advance(self, step: ScheduledStep) -> None:
        """Record what the runner computed: each decode row holds one more token, each chunk its tokens;
        newly full blocks are published."""
        for seq in step.decode:
            seq.table.length += 1
            self.blocks.register(seq.table, seq.state.ids)
        for seq, n in step.prefill:
            seq.table.length += n
            self.blocks.register(seq.table, seq.state.ids)

    def reap(self) -> None:
        """Drop aborted running requests and return their blocks."""
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            self.blocks.release(seq.table)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hashes = self.blocks.prompt_hashes(seq.table)
            hits = self.blocks.cached_prefix(seq.table)
            if len(hits) < len(hashes) and hashes[len(hits)] in self._in_flight():
                # A running request is prefilling this very prefix: wait for its blocks.
                self.blocks.pool.release(hits)
                break
            if not self.blocks.allocate(seq.table, hits, len(seq.prompt) + seq.max_new_tokens):
                break  # not enough memory now: wait for running requests to finish
            self.waiting.popleft()
            self.prefix_hit_tokens += len(hits) * BLOCK
            self.prompt_tokens += len(seq.prompt)
            self.running.append(seq)

    def _in_flight(self) -> set[bytes]:
        """Prefix hashes of prompt blocks that running requests have yet to fill and publish."""
        return {h for seq in self.running if not seq.prefilled
                for h in seq.table.prompt_hashes[seq.table.registered:]}
