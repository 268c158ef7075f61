"""The FastAPI app: routes, error bodies, request metrics and the body-size limit.

    POST /v1/chat/completions   chat, streamed (SSE) or whole
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 while shutting down
    GET  /metrics               Prometheus text format
    GET  /                      the web chat page (static/index.html; its assets under /static/)

`create_app(engine, config)` takes a running `AsyncEngine`; the app stops it on shutdown (after
uvicorn has let in-flight requests finish, see `run.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .asgi import PARSE_INLINE_BYTES as _PARSE_INLINE_BYTES
from .asgi import RequestMetrics as _RequestMetrics
from .asgi import error_response
from .asgi import read_body as _read_body
from .completions import ChatService, ClientDisconnected, Stream
from .config import ServerConfig
from .errors import APIError, Overloaded, log, to_api_error
from .guard import RequestGuard
from .metrics import CONTENT_TYPE, Metrics

_STATIC = Path(__file__).parent / "static"
# The page loads nothing but its own files; attachments are previewed from data: and blob: URLs.
_PAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Content-Security-Policy": (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")}


class _SSEResponse(StreamingResponse):
    """A streaming response that always closes its Stream, even when the body was never started."""

    def __init__(self, stream: Stream):
        super().__init__(stream.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()


async def _disconnected(request: Request) -> None:
    """Finishes when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine, config: ServerConfig = ServerConfig(), loopback: bool = True) -> FastAPI:
    """The OpenAI-compatible app over a running `AsyncEngine`.

    loopback: the server listens on a loopback address, so Host headers must name a loopback host
    (or one of config.allowed_hosts): a DNS-rebinding page cannot reach it.
    """
    metrics = Metrics(engine.stats)
    service = ChatService(engine, config, metrics)
    state = {"draining": False}

    async def drain() -> None:
        """Refuse new work; in-flight requests get shutdown_timeout_s, then are cut (streams end with an
        error event and [DONE], whole answers with a 503)."""
        state["draining"] = True
        await engine.stop(timeout=config.shutdown_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        """Nothing to start; on shutdown stop the engine (uvicorn has drained the connections by then)."""
        yield
        await drain()
        service.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="llavakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.metrics = metrics
    app.state.drain = drain
    # The last added runs first: the metrics see every answer, the guard's refusals included.
    app.add_middleware(RequestGuard, config=config, loopback=loopback)
    app.add_middleware(_RequestMetrics, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, config.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"message": f"{request.method} {request.url.path}: {exc.detail}", "type":
                          "invalid_request_error", "param": None, "code": kind}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(to_api_error(exc), config.retry_after_s)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI chat completions, whole or streamed."""
        arrived = time.perf_counter()
        if state["draining"]:
            raise Overloaded("the server is shutting down; retry on another server.")
        try:
            body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
        except ClientDisconnect:
            log.info("client went away while sending its request")
            return Response(status_code=499)  # nobody reads it; the status shows in the metrics
        if len(body) > _PARSE_INLINE_BYTES:  # megabytes of JSON and base64 take the loop too long to parse
            req = await asyncio.get_running_loop().run_in_executor(service.pool, service.parse, body)
        else:
            req = service.parse(body)
        try:
            prepared = await service.prepare(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise to_api_error(e) from None
        if req.stream:
            try:
                stream = await service.start_stream(prepared, req, arrived)
            except BaseException as e:
                service.release(len(prepared.params))
                if isinstance(e, Exception):
                    raise to_api_error(e) from None
                raise
            return _SSEResponse(stream)
        try:
            body = await service.complete(prepared, req.model, arrived, _disconnected(request))
        except ClientDisconnected:
            log.info("client went away; request %s aborted", prepared.cid)
            return Response(status_code=499)  # nobody reads it; the status shows in the metrics
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise to_api_error(e) from None
        finally:
            service.release(len(prepared.params))
        return JSONResponse(body)

    @app.get("/v1/models")
    async def models():
        """The one served model."""
        vlm = engine.vlm
        return {"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "llavakit",
            "root": config.served_model_name, "max_model_len": service.context, "model_type": vlm.config.model_type,
            "family": vlm.config.family.display_name,
            "input_modalities": ["text", "image"] + (["video"] if service.takes_video else [])}]}

    @app.get("/health")
    async def health():
        """200 while serving, 503 while shutting down."""
        if state["draining"]:
            return JSONResponse({"status": "shutting down"}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page():
        """The web chat page; it talks only to this server's API."""
        return FileResponse(_STATIC / "index.html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")
    return app
