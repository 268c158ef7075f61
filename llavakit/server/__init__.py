"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn; `pip install 'llavakit[serve]'`).

    protocol.py     request models (strict) and response shapes of the chat-completions subset
    media.py        image_url / video_url → checked bytes or paths; fetch.py: remote media without SSRF
    grammar.py      response_format → llguidance constraints
    completions.py  one request: checks, admission, encoding, n engine requests, streaming
    metrics.py      Prometheus metrics; app.py: the FastAPI app; run.py: uvicorn and shutdown
"""

from .app import create_app
from .config import ServerConfig
from .run import serve

__all__ = ["ServerConfig", "create_app", "serve"]
