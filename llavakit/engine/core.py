"""The engine: continuous batching over a block-based KV cache, with image-feature and prefix caches.

One class with one constructor and one `step`, used by the Python API, the server (through
AsyncEngine), batch jobs and evaluation. It joins three parts:

    add_request ──► Scheduler (scheduler.py, pure Python) ── who runs, who prefills how much
                        │  BlockManager (blocks.py, pure Python): blocks, verified prefix cache
                        ▼
                    ModelRunner (runner.py): tensors, tower, model, sampling ──► deltas

Every `step()`: the scheduler reaps aborted requests, admits waiting ones (blocks for their whole
answer, cached prefix blocks reused) and picks the decode rows and prompt chunks; the runner
computes them (outside the caller's lock); the scheduler records the new tokens and publishes full
blocks; finished requests give their blocks back. Requests join and leave at every step.

Memory: keys and values live in one pool per layer, sized from a byte budget and grown as needed.
A request that could never fit is refused with a clear error; one that does not fit now waits.

A row whose logits cannot be sampled (NaN or infinite) fails its own request only: its Delta
carries the error, the request is finished and its blocks freed, and the others go on.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import nullcontext
from typing import Iterable, Iterator

from ..errors import GenerationError
from ..model.llava import LlavaModel
from ..processing.processor import Encoded
from ..processing.prompt import TextTokenizer
from .blocks import BLOCK, ROOT_DIGEST, BlockManager, BlockPool, BlockTable, block_digest, token_keys
from .request import Delta, RequestState
from .runner import FeatureCache, Media, ModelRunner, kv_budget_blocks, media_of
from .sampling import SamplingParams
from .scheduler import Scheduler, Seq

PREFILL_CHUNK = 2048  # prompt tokens prefilled per step, so long prompts do not stall decoding for long

# Names that moved to blocks.py and runner.py, kept importable from here.
_token_keys = token_keys
_Media = Media
__all__ = ["BLOCK", "PREFILL_CHUNK", "ROOT_DIGEST", "BlockPool", "Engine", "FeatureCache", "block_digest",
           "media_of", "run_to_completion"]


class Engine:
    """Continuous batching over one loaded model. Not thread-safe by itself: AsyncEngine adds a lock.

    config: an EngineConfig (max_batch_size, kv_cache_bytes, image_cache_bytes).
    """

    def __init__(self, model: LlavaModel, tokenizer: TextTokenizer, eos_ids: set[int], config):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.config = config
        self.max_blocks = kv_budget_blocks(model, config.max_batch_size, config.kv_cache_bytes)
        # The pool starts small and grows up to the budget as requests need it: memory follows use.
        start = min(self.max_blocks, 4096 // BLOCK)
        # Read from this module when an engine is built, so patching core.PREFILL_CHUNK or core.block_digest
        # (tests do) reaches the scheduler and the block manager.
        self.blocks = BlockManager(start, self.max_blocks, digest=block_digest)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, PREFILL_CHUNK)
        self.runner = ModelRunner(model, eos_ids, start, config.image_cache_bytes)
        self.counters = dict(generation_tokens_total=0, requests_finished=0, requests_aborted=0, requests_failed=0)

    # -- views for tests and monitoring -------------------------------------------------------------
    @property
    def pool(self) -> BlockPool:
        return self.blocks.pool

    @property
    def running(self) -> list[Seq]:
        return self.scheduler.running

    @property
    def features(self) -> FeatureCache:
        return self.runner.features

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, encoded: Encoded, params: SamplingParams,
                    media: list[Media] | None = None) -> None:
        """Queue a request. Raises GenerationError when it can never fit the context or the KV pool.

        media: `media_of(encoded)`, when the caller computed it already (off its event loop).
        """
        prompt = list(encoded.input_ids)
        context = self.model.cfg.text.max_position_embeddings
        if len(prompt) >= context:
            raise GenerationError(
                f"the prompt holds {len(prompt)} tokens but the model's context is {context}; shorten the "
                "conversation or use fewer or smaller images."
            )
        if params.max_new_tokens > context - len(prompt):  # answers end at the context limit, as "length"
            params = dataclasses.replace(params, max_new_tokens=context - len(prompt))
        self.scheduler.check(request_id, len(prompt) + params.max_new_tokens)  # before hashing any pixels
        if media is None:
            media = media_of(encoded)
        cfg = self.model.cfg
        keys = token_keys(prompt, media, cfg.image_token_id, cfg.video_token_id)
        self.scheduler.add(Seq(request_id, prompt, params.max_new_tokens, BlockTable(keys),
                               RequestState.start(params, self.tokenizer, prompt), media))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks return to the pool at the start of the next step."""
        if self.scheduler.abort(request_id):
            self.counters["requests_aborted"] += 1

    def clear_caches(self) -> None:
        """Forget cached image features and prefixes (the next request starts cold)."""
        self.runner.features = FeatureCache(self.config.image_cache_bytes)
        self.blocks.pool.forget()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        """Gauges and counters for monitoring."""
        s, features, pool = self.scheduler, self.runner.features, self.blocks.pool
        c = self.counters
        return dict(prompt_tokens_total=s.prompt_tokens, generation_tokens_total=c["generation_tokens_total"],
                    prefix_cache_hit_tokens=s.prefix_hit_tokens, requests_finished=c["requests_finished"],
                    requests_aborted=c["requests_aborted"], requests_failed=c["requests_failed"],
                    vision_seconds_total=self.runner.vision_seconds,
                    requests_running=len(s.running), requests_waiting=len(s.waiting),
                    image_cache_hits=features.hits, image_cache_misses=features.misses,
                    image_cache_bytes=features.bytes, kv_blocks_total=pool.num_blocks,
                    kv_blocks_budget=self.max_blocks, kv_blocks_free=pool.available())

    # -- one iteration ------------------------------------------------------------------------------
    def step(self, lock: threading.Lock | None = None) -> list[tuple[str, Delta]]:
        """Advance every running request by one token and start waiting ones; return their deltas.

        With a lock, scheduling and bookkeeping happen under it and the model runs outside it, so
        callers can add and abort requests meanwhile. A request whose logits cannot be sampled gets
        one last Delta with `error` set (finish_reason "error") and is finished; the others go on.
        """
        guard = lock if lock is not None else nullcontext()
        with guard:
            scheduled = self.scheduler.schedule()
            num_blocks = self.blocks.pool.num_blocks
        self.runner.reserve(num_blocks)
        outputs = self.runner.run(scheduled)
        with guard:
            self.scheduler.advance(scheduled)
            result = []
            for seq, delta in outputs:
                if seq.aborted:
                    continue
                result.append((seq.request_id, delta))
                if delta.error is not None:
                    self.counters["requests_failed"] += 1
                else:
                    self.counters["generation_tokens_total"] += 1
                if delta.finish_reason is not None:
                    self.scheduler.finish(seq)
                    self.counters["requests_finished"] += 1
            self.scheduler.reap()
            return result


def run_to_completion(engine: Engine, requests: Iterable[tuple[str, Encoded, SamplingParams]]
                      ) -> Iterator[tuple[str, Delta]]:
    """Add `requests` (id, encoded, params) and step until each has finished, yielding their deltas
    as they come (other requests on the engine advance too; their deltas are not yielded).

    Closing the generator early (or an error while adding) aborts whichever of these requests are
    still in the engine. A failed request's Delta (`error` set) is yielded like any other: the
    caller decides whether to raise.
    """
    added: list[str] = []
    try:
        for request_id, encoded, params in requests:
            engine.add_request(request_id, encoded, params)
            added.append(request_id)
        pending = set(added)
        while pending:
            for request_id, delta in engine.step():
                if request_id in pending:
                    if delta.finish_reason is not None:
                        pending.discard(request_id)
                    yield request_id, delta
    finally:
        for request_id in added:
            engine.abort(request_id)  # a no-op for a finished request
