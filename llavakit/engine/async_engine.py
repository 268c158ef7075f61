"""An asyncio front for the engine: many concurrent callers, one worker thread that runs the model.

Callers (the server) `submit` an encoded request and iterate its deltas as they are produced;
`abort` cancels it and frees its slot at once. The worker loop runs the batching engine; the
event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import LlavakitError
from ..processing.processor import Encoded
from .request import Delta
from .sampling import SamplingParams


class EngineOverloaded(LlavakitError):
    """The request queue is full; retry later (the server answers 503 with Retry-After)."""


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine. Defaults protect a small machine."""

    max_batch_size: int = 16  # requests decoded together
    max_queue: int = 256  # requests waiting beyond the running batch; more are refused
    kv_cache_bytes: int | None = None  # memory for keys and values; None = sized from max_batch_size
    image_cache_bytes: int = 256 << 20  # projected image features kept for reuse (LRU)


# One step of one request: text, token_id, finish_reason, logprob, top_logprobs.
StreamDelta = Delta


_DONE = object()


class _Stream:
    """The deltas of one request. Closing it, even before reading, aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.closed = False

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> StreamDelta:
        if self.closed:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled: the consumer went away
            await self.aclose()
            raise
        if item is _DONE:
            await self.aclose()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        if item.finish_reason is not None:
            self.closed = True
            self.engine.abort(self.request_id)  # a no-op for a finished request; keeps the table tidy
        return item

    async def aclose(self) -> None:
        """Stop reading; the request is cancelled and its slot freed."""
        if not self.closed:
            self.closed = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Thread-backed async access to an `Engine` built on a loaded VLM."""

    def __init__(self, vlm, config: EngineConfig = EngineConfig()):
        from .core import Engine

        self.vlm = vlm
        self.config = config
        self.engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, config)
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False  # set by stop(): the worker thread exits
        self._thread = threading.Thread(target=self._run, name="llavakit-engine", daemon=True)
        self._thread.start()

    # -- called from the event loop -----------------------------------------------------------
    def encode(self, messages: Any, add_generation_prompt: bool | None = None,
               continue_final_message: bool = False) -> Encoded:
        """Render, load media and tokenize one conversation (CPU work: call it off the event loop).
        The keywords: see `Processor.render`."""
        return self.vlm.processor.encode(messages, add_generation_prompt,
                                         continue_final_message=continue_final_message)

    def media(self, encoded: Encoded) -> list:
        """The hashed media of an encoded request, for `submit` (CPU work: call it off the event loop)."""
        from .core import media_of

        return media_of(encoded)

    def submit(self, request_id: str, encoded: Encoded, params: SamplingParams,
               media: list | None = None) -> AsyncIterator[StreamDelta]:
        """Queue a request now and return the stream of its deltas (iterate it to the end, or close it).

        Call from a coroutine, with `media` from `self.media(encoded)` computed in a worker thread
        (without it the pixels are hashed here, on the caller's thread). Refusals are raised here, before any stream exists: EngineOverloaded
        when the queue is full or the engine is stopping, GenerationError when the request can
        never fit the context or the KV budget. A request that fails while running (NonFiniteLogits:
        its logits were NaN or infinite) raises from its stream; other requests are not affected.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopping:
                raise EngineOverloaded("the server is shutting down")
            if self.engine.num_waiting() >= self.config.max_queue:
                raise EngineOverloaded(f"{self.config.max_queue} requests are already waiting")
            self.engine.add_request(request_id, encoded, params, media)
            self._queues[request_id] = (loop, queue)
        self._wake.set()
        return _Stream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot and cache are freed before the next step, and its stream ends."""
        with self._lock:
            target = self._queues.pop(request_id, None)
            self.engine.abort(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    def stats(self) -> dict:
        """Counters and gauges for /metrics."""
        with self._lock:
            return self.engine.stats()

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` seconds, then cancel the rest."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.engine.has_unfinished():
                    break
            await asyncio.sleep(0.05)
        with self._lock:
            for request_id in list(self._queues):
                loop, queue = self._queues.pop(request_id)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
                self.engine.abort(request_id)
            self._closed = True
        self._wake.set()

    # -- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if not self.engine.has_unfinished():
                        break
                try:
                    outputs = self.engine.step(self._lock)
                except BaseException as e:  # a bug must fail its requests, not hang them
                    with self._lock:
                        for request_id in list(self._queues):
                            loop, queue = self._queues.pop(request_id)
                            loop.call_soon_threadsafe(queue.put_nowait, LlavakitError(f"engine failure: {e}"))
                            self.engine.abort(request_id)
                    continue
                with self._lock:
                    for request_id, delta in outputs:
                        target = self._queues.get(request_id)
                        if target is not None:
                            loop, queue = target
                            # A failed request (e.g. NonFiniteLogits) ends its own stream with the error;
                            # the engine has finished it and serves the others on.
                            item = delta if delta.error is None else delta.error
                            loop.call_soon_threadsafe(queue.put_nowait, item)
