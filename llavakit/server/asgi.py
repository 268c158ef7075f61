"""ASGI pieces shared by the one-process app (app.py) and the front of a replicated server (front.py):
error responses, counting responses by route and status, and reading a body under the limits.

Nothing here imports torch or the engine, so the front, which only moves bytes, stays light.
"""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.requests import Request

from .errors import APIError, PayloadTooLarge, RequestTimeout

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
PARSE_INLINE_BYTES = 256 << 10  # bodies above this are parsed in a worker thread, not on the event loop


def error_response(err: APIError, retry_after: int) -> JSONResponse:
    """The JSON response of an APIError (Retry-After on 429 and 503)."""
    headers = dict(err.headers)
    if err.status in (429, 503):
        headers.setdefault("Retry-After", str(retry_after))
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class RequestMetrics:
    """Pure ASGI middleware counting responses by route and status (BaseHTTPMiddleware would buffer streams).

    metrics: anything with a `requests` Counter labelled (route, status).
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or actual length), and
    with 408 when it has not all arrived within `timeout_s` (a client trickling its body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {int(declared)} bytes; this server accepts at most {limit} "
                              "(--max-body-bytes). Send smaller or fewer images.")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for piece in request.stream():
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(f"the request body is larger than this server's limit of {limit} bytes "
                                          "(--max-body-bytes). Send smaller or fewer images.")
                chunks.append(piece)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s (--body-timeout); "
                             f"{size} bytes came.") from None
    return b"".join(chunks)
