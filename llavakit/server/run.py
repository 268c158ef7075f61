"""Run the server: load a checkpoint, start the engine, serve with uvicorn, shut down cleanly on SIGTERM.

Shutdown on SIGTERM (or Ctrl-C):

    uvicorn stops accepting; /health answers 503 on open connections
        ─► in-flight requests run on for up to shutdown_timeout_s
        ─► the rest are cut by the engine: a stream ends with an error event and `data: [DONE]`, a
           whole answer is a 503 ─► lifespan: engine stopped ─► exit 0

The engine cuts them (not uvicorn, which would cancel the response tasks mid-write): uvicorn's own
deadline is set a little later, as a backstop for a client that does not read its last events.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .config import ServerConfig
from .guard import is_loopback_host

_BACKSTOP_S = 5.0  # after the engine's cut, time for the last events to reach the clients


def serve(vlm, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          kv_cache_bytes: int | None = None, image_cache_bytes: int = 256 << 20, log_level: str = "info") -> int:
    """Serve `vlm` until SIGTERM or SIGINT; returns the process exit status (0 after a graceful stop)."""
    from ..engine.async_engine import AsyncEngine, EngineConfig
    from .app import create_app

    # The engine's queue holds whatever the server admits, so the server's 429 speaks first and
    # the engine's own refusal (a 503) is left for shutdown.
    engine = AsyncEngine(vlm, EngineConfig(max_batch_size=max_batch_size, max_queue=config.max_concurrent_requests,
                                           kv_cache_bytes=kv_cache_bytes, image_cache_bytes=image_cache_bytes))
    app = create_app(engine, config, loopback=is_loopback_host(host))
    return run_uvicorn(app, lambda: app.state.drain(), config, host, port, log_level, lifespan="on")


def run_uvicorn(app, drain, config: ServerConfig, host: str, port: int, log_level: str, lifespan: str) -> int:
    """Serve the ASGI `app` with uvicorn until SIGTERM or SIGINT; returns the exit status (0 after a
    graceful stop). `drain()` (a coroutine) runs beside uvicorn's own shutdown and cuts what is still
    running at the deadline; uvicorn's deadline comes _BACKSTOP_S later. The one-process server and
    the replicas' front both run this way."""
    import uvicorn

    from .connections import guarded_protocol

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Start the drain with uvicorn's: it cuts what is still running at the deadline.
            pending = asyncio.ensure_future(drain())
            try:
                await super().shutdown(sockets)
            finally:
                await asyncio.gather(pending, return_exceptions=True)

    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                               timeout_graceful_shutdown=config.shutdown_timeout_s + _BACKSTOP_S, lifespan=lifespan,
                               http=guarded_protocol(config.max_connections, config.header_timeout_s),
                               timeout_keep_alive=config.keep_alive_timeout_s)
    server = _Server(uv_config)
    logging.getLogger("llavakit.server").setLevel(log_level.upper())
    # uvicorn re-raises the signal it caught once it has shut down, with the handler it found at
    # start: with a no-op handler there, a graceful SIGTERM stop ends in exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1
