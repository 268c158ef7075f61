"""Live servers for the server tests: `llavakit serve` in a subprocess on a free 127.0.0.1 port.

A subprocess (not a thread) so that the server's memory can be measured on its own, SIGTERM can
be sent to it, and the CLI is exercised as users run it. Each server is started on first use,
shared by the session, and stopped with SIGTERM at the end, which must give exit status 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server_helpers import Server


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The folder servers may read file:// media from."""
    return tmp_path_factory.mktemp("served_media")


# name -> (checkpoint, extra flags). "llama" is the battery's server: remote media allowed (only
# internal addresses are ever sent to it, which it must refuse before connecting), tight limits.
SERVERS = {
    "llama": ("llama", ["--allow-remote-media", "--max-body-bytes", "8000000", "--max-images-per-request", "4",
                        "--max-image-pixels", "4000000", "--remote-media-timeout", "3"]),
    "next_mistral": ("next_mistral", []),
    "onevision": ("onevision", ["--max-video-frames", "8"]),
    "next_video": ("next_video", []),
}


@pytest.fixture(scope="session")
def server(checkpoint, media_dir, tmp_path_factory):
    """server(name) -> a running Server (started on first use, stopped with SIGTERM at the end)."""
    running: dict[str, Server] = {}

    def get(name: str) -> Server:
        if name not in running:
            ckpt, flags = SERVERS[name]
            log = tmp_path_factory.mktemp("logs") / f"{name}.log"
            running[name] = Server(checkpoint(ckpt), name, flags + ["--allowed-local-media-path", str(media_dir)], log)
        return running[name]

    yield get
    failures = []
    for name, s in running.items():
        code = s.stop()
        if code != 0:
            failures.append(f"{name} exited with {code}:\n{s.log_tail()}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="session")
def local_vlm(checkpoint):
    """vlm(name) -> the same checkpoint loaded in this process (float32), for reference answers."""
    import llavakit
    import torch

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = llavakit.load(checkpoint(SERVERS[name][0]), dtype=torch.float32)
        return loaded[name]

    return get
