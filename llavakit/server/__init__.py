"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn; `pip install 'llavakit[serve]'`).

    protocol.py     request models (strict) and response shapes of the chat-completions subset
    media.py        image_url / video_url → checked bytes or paths (remote media through llavakit/fetch.py)
    guard.py        API key, Host header and content type; connections.py: connection cap, header deadline
    grammar.py      response_format → llguidance constraints
    completions.py  one request: checks, admission, encoding, n engine requests, streaming
    metrics.py      Prometheus metrics; app.py: the FastAPI app; run.py: uvicorn and shutdown
    asgi.py         error responses, request counting and body limits, shared by app.py and front.py
    front.py        `--replicas N`: the HTTP front that forwards each request to an engine replica
    replicas.py     `--replicas N`: the replicas on Ray Serve, the media-affinity router, the cluster
"""

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    # FastAPI is an optional extra: the CLI reads ServerConfig's defaults without it.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve":
        from .run import serve

        return serve
    raise AttributeError(name)
