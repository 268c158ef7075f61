"""Offline batch jobs: many requests from a folder, JSONL or Parquet file into a JSONL file.

`run_local` answers them on this machine's engine; `ray_job.run_ray` spreads them over Ray Data
replicas (imported only then: Ray is the optional `llavakit[ray]` extra).
"""

from .inputs import DEFAULT_PROMPT, Item, JobConfig, read_items
from .local import BatchSummary, run_local
from .output import FIELDS

__all__ = ["DEFAULT_PROMPT", "FIELDS", "BatchSummary", "Item", "JobConfig", "read_items", "run_local"]
