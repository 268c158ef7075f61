"""HTTP errors of the server and how every other exception maps onto them.

Bodies follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so clients show
the message. Client-fixable problems are 4xx; llavakit's own input errors (a bad image, a bad
prompt, bad sampling values) are 400; a remote medium that cannot be fetched is 422; overload is
429 or 503 with Retry-After. Anything unexpected is a 500 whose body does not leak internals.
"""

from __future__ import annotations

import logging

from ..errors import GenerationError, ImageError, LlavakitError, NonFiniteLogits, PromptError, VideoError

log = logging.getLogger("llavakit.server")


class APIError(LlavakitError):
    """An error with an HTTP status and an OpenAI-style body."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """400: the request is malformed or asks for something unsupported."""


class ModelNotFound(APIError):
    """404: the request names a model this server does not serve."""

    status = 404
    code = "model_not_found"


class PayloadTooLarge(APIError):
    """413: the body is larger than --max-body-bytes."""

    status = 413
    code = "request_too_large"


class RequestTimeout(APIError):
    """408: the request body did not arrive within --body-timeout."""

    status = 408
    code = "request_timeout"


class MediaFetchError(APIError):
    """422: a remote or local medium was allowed but could not be fetched (vLLM's split)."""

    status = 422
    code = "media_fetch_failed"


class TooManyRequests(APIError):
    """429: more choices in flight than --max-concurrent-requests; retry after a moment."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"


class Overloaded(APIError):
    """503: the engine's queue is full or the server is shutting down."""

    status = 503
    type = "server_error"
    code = "overloaded"


class InternalError(APIError):
    """500: a bug; the message is generic, the traceback goes to the log."""

    status = 500
    type = "server_error"
    code = "internal_error"


def to_api_error(exc: BaseException) -> APIError:
    """The APIError to answer for any exception raised while serving a request."""
    from ..engine.async_engine import EngineOverloaded

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return Overloaded(f"the server is overloaded: {exc} Retry shortly.")
    if isinstance(exc, ImageError):
        return BadRequest(str(exc), code="invalid_image")
    if isinstance(exc, VideoError):
        return BadRequest(str(exc), code="invalid_video")
    if isinstance(exc, PromptError):
        return BadRequest(str(exc), param="messages", code="invalid_prompt")
    if isinstance(exc, NonFiniteLogits):  # validated sampling values cannot cause it: the model did
        log.error("request failed: %s", exc)
        return InternalError(f"the model failed on this request: {exc}")
    if isinstance(exc, GenerationError):
        return BadRequest(str(exc), code="invalid_sampling_parameters")
    if isinstance(exc, LlavakitError):  # e.g. an engine failure: not the client's fault
        log.error("request failed: %s", exc)
        return InternalError(f"the model failed on this request: {exc}")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return InternalError("internal server error; the server log has the details.")
