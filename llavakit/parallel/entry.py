"""`python -m llavakit.parallel.entry`: a rank that rank 0 started (ranks 1..N-1 of a local run).

Its own module so that worker.py (the command loop) and launch.py (which starts ranks and loads
their shards) do not import each other: this entry point needs both.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from ..errors import ParallelError
from .launch import run_worker
from .worker import SPEC_ENV, watch_parent


def main() -> int:
    """Entry point of a rank started by rank 0 (see launch.py)."""
    spec = json.loads(os.environ[SPEC_ENV])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(spec["parent"])
    try:
        run_worker(spec)
    except ParallelError as e:
        print(f"llavakit: tensor-parallel rank {spec['rank']}: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        print(f"llavakit: tensor-parallel rank {spec['rank']} failed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
