"""POST /v1/chat/completions: a validated request → checked media → encoded prompt → n engine requests.

    parse (protocol) ─► cheap checks: model, n, stop, media counts ─► admit n choices (or 429)
        ─► media threads: URLs → checked bytes, render + tokenize (engine.encode) ─► context check
        ─► one engine request per choice ─► a whole completion, or SSE chunks ending in [DONE]

Every check that can fail cheaply runs before one that costs; the event loop never decodes,
tokenizes or runs the model. A choice's engine request is aborted when its consumer goes away:
cancelling the task that iterates `engine.submit` runs its `finally`, which frees the slot.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from ..engine.sampling import MAX_STOP_CHARS, SamplingParams
from ..runtime import trim_freed_memory
from .config import ServerConfig
from .errors import BadRequest, ModelNotFound, Overloaded, TooManyRequests, to_api_error
from .grammar import GrammarCompiler
from .media import MediaResolver
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, ImagePart, TextPart, VideoPart, chunk, completion, logprob_entry,
                       new_id, now, parse_request, sse, usage_chunk)

_IDLE_TRIM_DELAY_S = 2.0  # quiet time before freed memory is handed back


def template_role(role: str, template: str) -> str:
    """The role a message's template gets. `developer` is OpenAI's newer name for system instructions:
    a template that names the role gets it as it is (as vLLM passes it); one that does not (LLaVA's
    templates) gets the `system` role it means, not a turn it would render as an unknown speaker."""
    if role == "developer" and "developer" not in template:
        return "system"
    return role


class ClientDisconnected(Exception):
    """The client closed the connection before its whole answer was ready."""


@dataclass
class Prepared:
    """A request ready for the engine: its prompt and one SamplingParams per choice."""

    cid: str
    created: int
    encoded: object  # processing.processor.Encoded
    params: list[SamplingParams]
    media: list | None = None  # the engine's hashed media, computed in a media thread

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens, image and video tokens included."""
        return len(self.encoded.input_ids)


@dataclass
class _Choice:
    index: int
    text: list
    logprobs: list | None
    tokens: int = 0
    finish_reason: str | None = None


class ChatService:
    """The chat-completions logic of one server, on one engine."""

    def __init__(self, engine, cfg: ServerConfig, metrics: Metrics):
        self.engine = engine
        self.vlm = engine.vlm
        self.cfg = cfg
        self.metrics = metrics
        self.media = MediaResolver(cfg)
        tok = self.vlm.processor.tokenizer
        self.tokenizer = tok
        self.eos_ids = set(self.vlm.eos_ids)
        self.grammar = GrammarCompiler(tok, self.vlm.config.text.vocab_size, self.eos_ids)
        self.context = self.vlm.config.text.max_position_embeddings
        self.takes_video = self.vlm.config.video_token_id is not None
        self.pool = ThreadPoolExecutor(cfg.media_workers, thread_name_prefix="llavakit-media")
        self.in_flight = 0  # admitted choices; the event loop is the only writer
        self.model_names = {cfg.served_model_name, str(self.vlm.folder), self.vlm.folder.name}
        self.max_text_chars = cfg.max_text_chars or 8 * self.context
        self._trim = None  # the pending idle trim

    def parse(self, body: bytes) -> ChatCompletionRequest:
        """The validated request of a body, under this server's size limits (blocking for large bodies)."""
        return parse_request(body, self.cfg.max_messages, self.max_text_chars)

    # -- admission ------------------------------------------------------------------------------
    def _admit(self, n: int) -> None:
        if self.in_flight + n > self.cfg.max_concurrent_requests:
            raise TooManyRequests(f"{self.in_flight} choices are in flight, the limit is "
                                  f"{self.cfg.max_concurrent_requests}; retry shortly.")
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)

    def release(self, n: int) -> None:
        """Give back the admission of n choices; once the server has been idle a moment, trim the heap."""
        self.in_flight -= n
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0 and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(_IDLE_TRIM_DELAY_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim = None
        if self.in_flight == 0:
            try:
                self.pool.submit(trim_freed_memory)
            except RuntimeError:  # shutting down: the pool is closed
                pass

    # -- preparation -----------------------------------------------------------------------------
    def _check(self, req: ChatCompletionRequest) -> None:
        """The limits that need no decoding."""
        if req.model not in self.model_names:
            shown = req.model if len(req.model) <= 80 else req.model[:77] + "..."
            raise ModelNotFound(f"model {shown!r} is not served here; this server serves "
                                f"{self.cfg.served_model_name!r} (see /v1/models).", param="model")
        n = req.n or 1
        if n > self.cfg.max_n:
            raise BadRequest(f"n is {n}, this server allows at most {self.cfg.max_n}.", param="n",
                             code="invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > self.cfg.max_stop or not all(stops):
            raise BadRequest(f"stop takes at most {self.cfg.max_stop} non-empty strings.", param="stop",
                             code="invalid_value")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise BadRequest(f"each stop string may hold at most {MAX_STOP_CHARS} characters.", param="stop",
                             code="invalid_value")
        images = videos = 0
        for m in req.messages:
            for part in m.content if isinstance(m.content, list) else ():
                images += isinstance(part, ImagePart)
                videos += isinstance(part, VideoPart)
        if images > self.cfg.max_images_per_request:
            raise BadRequest(f"the request holds {images} images; this server accepts at most "
                             f"{self.cfg.max_images_per_request}.", param="messages", code="too_many_images")
        if videos and not self.takes_video:
            raise BadRequest(f"this model ({self.vlm.config.model_type}) takes images only, not video.",
                             param="messages", code="video_unsupported")
        if videos > self.cfg.max_videos_per_request:
            raise BadRequest(f"the request holds {videos} videos; this server accepts at most "
                             f"{self.cfg.max_videos_per_request}.", param="messages", code="too_many_videos")

    def _messages(self, req: ChatCompletionRequest) -> list[dict]:
        """The conversation in llavakit's format, every medium resolved to checked bytes (blocking)."""
        out = []
        for i, m in enumerate(req.messages):
            role = template_role(m.role, self.vlm.processor.chat_template)
            if isinstance(m.content, str):
                out.append({"role": role, "content": m.content})
                continue
            parts = []
            for j, part in enumerate(m.content):
                param = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImagePart):
                    parts.append({"type": "image", "image": self.media.image(part.image_url.url, param + ".image_url"),
                                  "detail": part.image_url.detail})
                else:
                    v = part.video_url
                    if v.num_frames is not None and v.num_frames > self.cfg.max_video_frames:
                        raise BadRequest(f"{param}.video_url.num_frames is {v.num_frames}; this server samples at "
                                         f"most {self.cfg.max_video_frames} frames.", param=param + ".video_url",
                                         code="too_many_frames")
                    num_frames = v.num_frames
                    if num_frames is None and v.fps is None:
                        num_frames = min(self.vlm.processor.num_frames, self.cfg.max_video_frames)
                    parts.append({"type": "video", "video": self.media.video(v.url, param + ".video_url"),
                                  "num_frames": num_frames, "fps": v.fps, "max_frames": self.cfg.max_video_frames})
            out.append({"role": role, "content": parts})
        return out

    def _encode(self, req: ChatCompletionRequest):
        """(encoded prompt, hashed media): decoding, tokenizing and hashing, all in a media thread."""
        start = time.perf_counter()
        encoded = self.engine.encode(self._messages(req), req.add_generation_prompt, bool(req.continue_final_message))
        media = self.engine.media(encoded)
        self.metrics.encode_latency.observe(time.perf_counter() - start)
        return encoded, media

    def _constraints(self, req: ChatCompletionRequest, n: int) -> list:
        """One fresh grammar state per choice (compiling and building matchers can take a while: not on the loop)."""
        fmt = req.response_format
        grammar = self.grammar.compile(fmt.type, fmt.json_schema.json_schema if fmt.json_schema is not None else None)
        return [self.grammar.constraint(grammar) for _ in range(n)]

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Check, admit, encode and turn a request into engine inputs. The caller must `release(len(params))`."""
        self._check(req)
        n = req.n or 1
        self._admit(n)
        try:
            constraints = [None] * n
            if req.response_format is not None and req.response_format.type != "text":
                constraints = await self._in_pool(self._constraints, req, n)
            encoded, media = await self._in_pool(self._encode, req)
            prompt = len(encoded.input_ids)
            max_tokens = req.max_completion_tokens or req.max_tokens
            if prompt >= self.context:
                raise BadRequest(f"the prompt is {prompt} tokens (images included); this model's context is "
                                 f"{self.context} tokens. Shorten the conversation or send fewer or smaller images.",
                                 param="messages", code="context_length_exceeded")
            if max_tokens is None:
                max_tokens = min(self.cfg.default_max_tokens, self.context - prompt)
            elif prompt + max_tokens > self.context:
                raise BadRequest(f"this model's context is {self.context} tokens; the prompt has {prompt} "
                                 f"(images included) and max_tokens asks for {max_tokens} more. Lower max_tokens "
                                 f"to at most {self.context - prompt}.", param="max_tokens",
                                 code="context_length_exceeded")
            stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
            params = []
            for i in range(n):
                seed = None if req.seed is None else (req.seed + i) % 2**63
                params.append(SamplingParams(
                    max_new_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=max(0, req.top_k or 0),
                    repetition_penalty=req.repetition_penalty or 1.0,
                    seed=seed, stop=stops, ignore_eos=bool(req.ignore_eos),
                    logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0, constraint=constraints[i]))
            return Prepared(new_id(), now(), encoded, params, media)
        except BaseException:
            self.release(n)
            raise

    # -- running ---------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=65536)
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, delta, params: SamplingParams) -> dict | None:
        if not params.logprobs or delta.logprob is None:
            return None
        if delta.token_id in self.eos_ids and delta.finish_reason == "stop" and not params.ignore_eos:
            return None  # the end token is not part of the answer
        top = [(self._token_text(t), lp) for t, lp in delta.top_logprobs] if params.top_logprobs else []
        return logprob_entry(self._token_text(delta.token_id), delta.logprob, top)

    async def _run_choice(self, p: Prepared, index: int, arrived: float, sink) -> None:
        """Feed one choice's deltas to `sink(index, delta, logprob_entry)`; records latency metrics."""
        last = None
        async for delta in self.engine.submit(f"{p.cid}-{index}", p.encoded, p.params[index], p.media):
            t = time.perf_counter()
            if last is None:
                self.metrics.ttft.observe(t - arrived)
            else:
                self.metrics.inter_token.observe(t - last)
            last = t
            sink(index, delta, self._logprobs(delta, p.params[index]))
        self.metrics.request_latency.observe(time.perf_counter() - arrived)

    def _account(self, p: Prepared, choices: list[_Choice]) -> None:
        self.metrics.prompt_tokens.inc(p.prompt_tokens)
        self.metrics.generation_tokens.inc(sum(c.tokens for c in choices))
        for c in choices:
            self.metrics.finished.labels(c.finish_reason or "abort").inc()

    async def _start(self, p: Prepared, arrived: float, sink) -> list[asyncio.Task]:
        """Start every choice; an engine refusal (queue full, shutting down) surfaces here, before any reply."""
        tasks = [asyncio.create_task(self._run_choice(p, i, arrived, sink)) for i in range(len(p.params))]
        # A task runs up to its first real wait (the engine queue) in the next loop turn: a refusal
        # by submit() is raised by then, so it can still become a 503 instead of a broken stream.
        await asyncio.sleep(0)
        for t in tasks:
            if t.done() and t.exception() is not None:
                await _cancel(tasks)
                raise t.exception()
        return tasks

    async def complete(self, p: Prepared, model: str, arrived: float, disconnected) -> dict:
        """A whole chat.completion; `disconnected` is an awaitable that finishes when the client goes away."""
        choices = [_Choice(i, [], [] if p.params[i].logprobs else None) for i in range(len(p.params))]

        def sink(i, delta, lp):
            c = choices[i]
            c.text.append(delta.text)
            c.tokens += 1
            c.finish_reason = delta.finish_reason or c.finish_reason
            if lp is not None:
                c.logprobs.append(lp)

        watcher = asyncio.ensure_future(disconnected)
        tasks = []
        try:
            tasks = await self._start(p, arrived, sink)
            work = asyncio.gather(*tasks)
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: free the engine, nobody reads the answer
                work.cancel()  # cancels the choices; a cancelled gather leaves no unretrieved exception to log
                raise ClientDisconnected
            work.result()
        finally:
            watcher.cancel()
            await _cancel(tasks)
        self._account(p, choices)
        if any(c.finish_reason is None for c in choices):
            raise Overloaded("the server is shutting down; the request was cancelled. Retry on another server.")
        return completion(p.cid, model, p.created, [
            {"index": c.index, "text": "".join(c.text), "finish_reason": c.finish_reason,
             "completion_tokens": c.tokens, "logprobs": {"content": c.logprobs} if c.logprobs is not None else None}
            for c in choices], p.prompt_tokens)

    async def start_stream(self, p: Prepared, req: ChatCompletionRequest, arrived: float) -> "Stream":
        """Start the choices now (so refusals are still HTTP errors) and return the stream to send."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = await self._start(p, arrived, lambda i, d, lp: queue.put_nowait((i, d, lp)))
        return Stream(self, p, req, tasks, queue)


class Stream:
    """One streamed answer: `events()` is the SSE body; `close()` (idempotent) aborts and releases.

    Cleanup is not left to the generator's `finally`: a generator that is never started (the
    client left before the first byte) never runs it, and its admission would leak.
    """

    def __init__(self, service: ChatService, p: Prepared, req: ChatCompletionRequest, tasks: list[asyncio.Task],
                 queue: asyncio.Queue):
        self.service, self.p, self.req, self.tasks, self.queue = service, p, req, tasks, queue
        self.choices = [_Choice(i, [], None) for i in range(len(p.params))]
        self.done = asyncio.ensure_future(asyncio.gather(*tasks))
        self.done.add_done_callback(lambda _: queue.put_nowait(None))  # wakes the reader when every choice ended
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        """SSE chunks: a role chunk per choice, content chunks, finish chunks, usage if asked, [DONE]."""
        p, req = self.p, self.req
        model, cid, created = req.model, p.cid, p.created
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            for c in self.choices:
                yield sse(chunk(cid, model, created, c.index, {"role": "assistant", "content": ""},
                                with_usage=include_usage))
            while True:
                item = await self.queue.get()
                if item is None:
                    break
                i, delta, lp = item
                c = self.choices[i]
                c.tokens += 1
                c.finish_reason = delta.finish_reason
                if not delta.text and delta.finish_reason is None and lp is None:
                    continue  # a token that completes no character yet (or is held as a stop-string prefix)
                yield sse(chunk(cid, model, created, i, {"content": delta.text} if delta.text else {},
                                delta.finish_reason, {"content": [lp]} if lp is not None else None,
                                with_usage=include_usage))
            self.done.result()  # an engine failure surfaces here, as an error event
            if any(c.finish_reason is None for c in self.choices):
                raise Overloaded("the server is shutting down; the request was cancelled.")
            if include_usage:
                yield sse(usage_chunk(cid, model, created, p.prompt_tokens, sum(c.tokens for c in self.choices)))
        except Exception as e:  # headers are sent: the error can only travel as an event
            yield sse(to_api_error(e).body())
        yield sse("[DONE]")

    async def close(self) -> None:
        """Abort unfinished choices, record the metrics and give back the admission (once)."""
        if self.closed:
            return
        self.closed = True
        self.done.cancel()
        await _cancel(self.tasks)
        self.service._account(self.p, self.choices)
        self.service.release(len(self.p.params))


async def _cancel(tasks: list[asyncio.Task]) -> None:
    """Cancel tasks and wait for them, so each one's engine request is aborted before we go on."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


