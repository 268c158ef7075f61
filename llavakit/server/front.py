"""The front of a replicated server (`llavakit serve --replicas N`): the process that owns the
connections and hands each request, whole, to one engine replica, which answers it with the
one-process server's own app.

    client ─► front (uvicorn): connection cap, header and body deadlines, body size, Host / API key /
              content type: the same limits and guard as one process, checked before any replica works
          ─► GET /health, GET /metrics: answered here (/metrics: this process's request counts, plus
             the sum of the replicas' own metrics)
          ─► anything else: Forwarded(method, path, headers, body) ─► backend.stream(request, key)
             ─► a replica runs it through create_app's app (`run_asgi`) and streams back the ASGI
                messages: status and headers, then the body, SSE events as the engine writes them

The key is a hash of the request's first image or video URL: requests about the same picture go to
the replica that holds its features and its prompt's KV blocks. The backend (replicas.py, on Ray
Serve) is passed in, so this module needs neither Ray nor torch.

Shutdown mirrors one process: new chat requests get 503, forwarded ones get `shutdown_timeout_s`,
then the front cuts them itself (a stream ends with an error event and `data: [DONE]`, an answer
not yet started is a 503) and the replica's work is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect, Request

from .asgi import PARSE_INLINE_BYTES, RequestMetrics, error_response, read_body
from .config import ServerConfig
from .errors import APIError, InternalError, Overloaded, log
from .guard import RequestGuard
from .metrics import CONTENT_TYPE
from .protocol import sse

FRESH_S = 5.0  # a replica that has not reported its metrics for this long is gone: its gauges stop counting
_CUT = "the server is shutting down; the request was cancelled. Retry on another server."


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the front received it, for a replica to answer."""

    method: str
    path: str
    query_string: bytes
    headers: list  # [(name, value)] as bytes, lower-case names, as ASGI has them
    body: bytes
    client: tuple | None = None  # (host, port) of the caller
    server: tuple | None = None  # (host, port) the front listens on


@dataclass(frozen=True)
class ReplicaReport:
    """The latest metrics one replica reported."""

    replica: str  # Ray Serve's replica id
    pid: int
    node: str  # the node's IP address
    rss: int  # resident memory of the replica's process, bytes (0 where unknown)
    text: str  # its /metrics body
    age_s: float  # seconds since it reported
    ranks: tuple = ()  # with tensor-parallel ranks: (rank, pid, resident bytes) of each, rank 0 the replica's own


def affinity_key(body: bytes) -> str:
    """The routing key of a chat request: a hash of its first image_url or video_url URL; "" when it has
    none, or is not the JSON of a chat request (the replica then answers the error as one process would)."""
    try:
        req = json.loads(body)
    except ValueError:
        return ""
    messages = req.get("messages") if isinstance(req, dict) else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            media = (part.get("image_url") or part.get("video_url")) if isinstance(part, dict) else None
            url = media.get("url") if isinstance(media, dict) else None
            if isinstance(url, str) and url:
                return hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return ""


# ───────────────────────────── on a replica ─────────────────────────────


async def run_asgi(app, request: Forwarded) -> AsyncIterator[dict]:
    """Run one forwarded request through an ASGI app in this process; yield the messages it sends.

    Body pieces that are ready together travel as one message (fewer hops back to the front). When
    the consumer stops early (its client left, or the front cut the request at shutdown), the app
    sees its client disconnect, so it aborts the request's engine work as it would in one process.
    """
    pending: collections.deque = collections.deque()
    ready = asyncio.Event()
    gone = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        pending.append(message)
        ready.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode("utf-8", "surrogateescape"),
             "query_string": request.query_string, "root_path": "", "headers": request.headers,
             "client": request.client, "server": request.server}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: ready.set())
    started = False
    try:
        while True:
            await ready.wait()
            ready.clear()
            while pending:
                message = pending.popleft()
                started = started or message["type"] == "http.response.start"
                yield _join_bodies(message, pending) if message["type"] == "http.response.body" else message
            if task.done() and not pending:
                break
        if task.exception() is not None and not started:  # an app that fails sends its 500 first; this one did not
            log.error("a forwarded request failed", exc_info=task.exception())
            err = InternalError("internal server error; the server log has the details.")
            yield {"type": "http.response.start", "status": err.status, "headers": [(b"content-type",
                                                                                      b"application/json")]}
            yield {"type": "http.response.body", "body": json.dumps(err.body()).encode()}
    finally:
        if not task.done():
            gone.set()  # as when a client leaves: the app aborts its engine requests
            await asyncio.wait({task}, timeout=5.0)
            task.cancel()


def _join_bodies(message: dict, pending: collections.deque) -> dict:
    """A body message and the body messages queued right behind it, as one."""
    pieces, more = [message.get("body", b"")], message.get("more_body", False)
    while more and pending and pending[0]["type"] == "http.response.body":
        following = pending.popleft()
        pieces.append(following.get("body", b""))
        more = following.get("more_body", False)
    return {"type": "http.response.body", "body": b"".join(pieces), "more_body": more}


# ───────────────────────────── the front ─────────────────────────────


class FrontMetrics:
    """The front's /metrics: its own request counts and the sum of the replicas' metrics."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("llavakit_http_requests", "HTTP requests by route and status code (at the front)",
                                ["route", "status"], registry=self.registry)

    def render(self, reports: list[ReplicaReport]) -> bytes:
        """The Prometheus text of the front's counters and the replicas' merged metrics."""
        return generate_latest(self.registry) + generate_latest(_Snapshot(merge_reports(reports)))


class _Snapshot:
    """A collector over a fixed list of metric families (for generate_latest)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        """The families."""
        return iter(self.families)


def merge_reports(reports: list[ReplicaReport]) -> list[Metric]:
    """The replicas' metrics summed sample by sample (counters, histograms and gauges alike: requests
    running, cache hits, latency buckets), the hit rates recomputed from the sums, and the series of
    the replicas themselves: how many report, and each one's resident memory (and each of its tensor-parallel
    ranks', when it has some).

    A replica that stopped reporting (killed, scaled down) keeps its counters and histograms in the
    sums, so they never go down, but its gauges no longer count.
    """
    families: dict[str, Metric] = {}
    totals: dict[tuple, float] = {}
    for report in reports:
        for family in text_string_to_metric_families(report.text):
            if family.name == "llavakit_http_requests" or family.name.endswith("_hit_rate"):
                continue  # the front counts requests itself; rates are recomputed below
            if family.type == "gauge" and report.age_s > FRESH_S:
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue  # creation times do not add up
                key = (family.name, s.name, tuple(sorted(s.labels.items())))
                totals[key] = totals.get(key, 0.0) + s.value
    for (name, sample, labels), value in totals.items():
        families[name].add_sample(sample, dict(labels), value)
    flat = {sample: value for (_, sample, labels), value in totals.items() if not labels}
    hits, misses = flat.get("llavakit_image_cache_hits_total", 0.0), flat.get("llavakit_image_cache_misses_total", 0.0)
    rate = GaugeMetricFamily("llavakit_image_cache_hit_rate", "Image-feature cache hits / lookups, all replicas")
    rate.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
    prompt = flat.get("llavakit_engine_prompt_tokens_total", 0.0)
    prefix = GaugeMetricFamily("llavakit_prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens, all replicas")
    prefix.add_metric([], flat.get("llavakit_prefix_cache_hit_tokens_total", 0.0) / prompt if prompt else 0.0)
    fresh = [r for r in reports if r.age_s <= FRESH_S]
    count = GaugeMetricFamily("llavakit_replicas", f"Replicas that reported in the last {FRESH_S:g} s")
    count.add_metric([], len(fresh))
    memory = GaugeMetricFamily("llavakit_replica_resident_memory_bytes", "Resident memory of each replica's process",
                               labels=["replica", "pid", "node"])
    for r in fresh:
        memory.add_metric([r.replica, str(r.pid), r.node], r.rss)
    ranks = GaugeMetricFamily("llavakit_replica_rank_resident_memory_bytes",
                              "Resident memory of each tensor-parallel rank's process of each replica (rank 0 is the "
                              "replica's own)", labels=["replica", "rank", "pid", "node"])
    for r in fresh:
        for rank, pid, rss in r.ranks:
            ranks.add_metric([r.replica, str(rank), str(pid), r.node], rss)
    return list(families.values()) + [rate, prefix, count, memory] + ([ranks] if any(r.ranks for r in fresh) else [])


class Front:
    """The front's ASGI app over a backend: `backend.stream(Forwarded, key)` yields a replica's ASGI
    messages (raising an APIError when no replica can answer), `backend.reports()` returns the
    replicas' latest ReplicaReports.

    media_affinity: route by the first medium's hash (False: by load alone).
    """

    def __init__(self, backend, config: ServerConfig = ServerConfig(), loopback: bool = True,
                 media_affinity: bool = True):
        self.backend, self.config, self.media_affinity = backend, config, media_affinity
        self.metrics = FrontMetrics()
        self.draining = False
        self.calls: set[_Call] = set()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llavakit-front")  # large bodies are parsed here
        # As in one process: the metrics see every answer, the guard's refusals included.
        self.app = RequestMetrics(RequestGuard(self._route, config, loopback), self.metrics)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)

    async def drain(self) -> None:
        """Refuse new chat requests; forwarded ones get shutdown_timeout_s, then are cut."""
        self.draining = True
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for call in list(self.calls):
            call.cut()
        deadline = time.monotonic() + 5.0
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _route(self, scope, receive, send):
        if scope["type"] == "websocket":  # not served, as in one process
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            if self.draining:
                response = JSONResponse({"status": "shutting down"}, status_code=503,
                                        headers={"Retry-After": str(self.config.retry_after_s)})
            else:
                response = JSONResponse({"status": "ok"})
        elif path == "/metrics" and method == "GET":
            response = Response(self.metrics.render(await self._reports()), media_type=CONTENT_TYPE)
        elif self.draining and path == "/v1/chat/completions":
            response = error_response(Overloaded("the server is shutting down; retry on another server."),
                                      self.config.retry_after_s)
        else:
            return await self._forward(scope, receive, send)
        await response(scope, receive, send)

    async def _reports(self) -> list[ReplicaReport]:
        try:
            return await asyncio.wait_for(self.backend.reports(), 5.0)
        except Exception as e:  # a scrape must answer even when the cluster does not
            log.warning("could not read the replicas' metrics: %s", e)
            return []

    async def _forward(self, scope, receive, send):
        cfg = self.config
        try:
            body = await read_body(Request(scope, receive), cfg.max_body_bytes, cfg.body_timeout_s)
        except ClientDisconnect:
            log.info("client went away while sending its request")
            return await Response(status_code=499)(scope, receive, send)  # nobody reads it; /metrics counts it
        except APIError as e:
            return await error_response(e, cfg.retry_after_s)(scope, receive, send)
        key = ""
        if self.media_affinity and scope["path"] == "/v1/chat/completions":
            if len(body) > PARSE_INLINE_BYTES:  # megabytes of JSON take the loop too long to parse
                key = await asyncio.get_running_loop().run_in_executor(self.pool, affinity_key, body)
            else:
                key = affinity_key(body)
        request = Forwarded(scope["method"], scope["path"], scope.get("query_string", b""), list(scope["headers"]),
                            body, scope.get("client"), scope.get("server"))
        call = _Call(self, request, key, scope, receive, send)
        self.calls.add(call)
        try:
            await call.run()
        finally:
            self.calls.discard(call)


class _Call:
    """One forwarded request: relays a replica's messages to the client until the answer ends, the client
    leaves (the replica's work is cancelled), or the front cuts it at shutdown."""

    def __init__(self, front: Front, request: Forwarded, key: str, scope, receive, send):
        self.front, self.request, self.key = front, request, key
        self.scope, self.receive, self.send = scope, receive, send
        self.started = False  # the status line went out
        self.finished = False  # the last body piece went out
        self.events = False  # the answer is a server-sent event stream
        self.relay: asyncio.Task | None = None
        self.was_cut = False

    async def run(self) -> None:
        """Relay the answer; returns when it is complete or abandoned."""
        self.relay = asyncio.ensure_future(self._relay())
        if self.was_cut:  # cut before it started
            self.relay.cancel()
        gone = asyncio.ensure_future(self._client_gone())
        try:
            await asyncio.wait({self.relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not self.relay.done() and not self.finished:  # the client left: stop the replica's work
                self.relay.cancel()
                log.info("client went away; its forwarded request was cancelled")
            await asyncio.gather(self.relay, return_exceptions=True)
        if gone.done() and not gone.cancelled() and not self.started:
            await Response(status_code=499)(self.scope, self.receive, self.send)  # nobody reads it; counted

    def cut(self) -> None:
        """End the request now (shutdown): the client gets an error, the replica's work is cancelled."""
        self.was_cut = True
        if self.relay is not None and not self.relay.done():
            self.relay.cancel()

    async def _client_gone(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _relay(self) -> None:
        try:
            async for message in self.front.backend.stream(self.request, self.key):
                if message["type"] == "http.response.start":
                    self.started = True
                    self.events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in message.get("headers", ()))
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    self.finished = True
                await self.send(message)
        except asyncio.CancelledError:
            if self.was_cut:
                await self._end(Overloaded(_CUT))
            return
        except APIError as e:
            await self._end(e)
        except OSError:  # the client left while we wrote
            return
        except Exception as e:
            log.error("a forwarded request failed", exc_info=e)
            await self._end(InternalError("internal server error; the server log has the details."))
        else:
            if not self.finished:  # the replica's answer ended early
                await self._end(Overloaded("the replica answering this request stopped; retry."))

    async def _end(self, err: APIError) -> None:
        """Finish the response with `err`: its JSON when nothing was sent yet, else an error event and
        [DONE] on a stream (a whole answer goes out in one piece, so it is never cut halfway)."""
        if self.finished:
            return
        self.finished = True
        if not self.started:
            self.started = True
            return await error_response(err, self.front.config.retry_after_s)(self.scope, self.receive, self.send)
        tail = sse(err.body()) + sse("[DONE]") if self.events else b""
        await self.send({"type": "http.response.body", "body": tail, "more_body": False})
