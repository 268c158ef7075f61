"""A batch job on Ray Data: the same items and records as the local job, spread over model replicas.

    driver: read_items ─► ray.data.from_items ─► map_batches(_Replica, concurrency=replicas) ─► shards ─► output
                            (ids + unloaded        each replica: the model loaded once, its own
                             conversations)        engine, one Ray batch at a time (run_items)

The driver reads and checks the input exactly as the local job does (bad lines, duplicate ids,
ids already done), so only good items travel; replicas load the media themselves. Every block of
results the driver receives is written at once as a shard (`OUTPUT.shards/part-NNNNN.jsonl`, or
`.parquet`), renamed into place whole, so a killed job keeps every shard it wrote and `--resume`
skips their ids. At the end the shards are merged into OUTPUT, in the local job's exact form.

Ray is imported only here, and only `llavakit batch --ray` imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import LlavakitError
from ..weights import read_raw_config, resolve_model_dir
from .inputs import Item, JobConfig, count_items, read_items
from .local import BatchSummary, new_engine, run_items
from .output import FIELDS, OutputError, Progress, dumps, read_done, record

RAY_HINT = "pip install 'llavakit[ray]'"


class RayMissing(LlavakitError):
    """`--ray` was asked for but Ray Data (or pyarrow) is not installed."""


class RayJobError(LlavakitError):
    """The Ray job itself failed (a replica could not start, the cluster went away); finished shards are kept."""


def _import_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayMissing(f"--ray needs Ray Data and pyarrow: {RAY_HINT} ({e}).") from e
    return ray


def _schema():
    import pyarrow as pa

    types = {"id": pa.string(), "answer": pa.string(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
             "finish_reason": pa.string(), "seconds": pa.float64(), "error": pa.string()}
    return pa.schema([(name, types[name]) for name in FIELDS])


class _Replica:
    """One model replica (a Ray actor): loads the model once, then answers one batch of items per call."""

    def __init__(self, model: str, load_kwargs: dict[str, Any], job: JobConfig, max_batch_size: int, threads: int):
        import torch

        import llavakit

        torch.set_num_threads(max(1, threads))  # Ray's CPU share for this actor, not the node's core count
        self.vlm = llavakit.load(model, **load_kwargs)
        self.engine = new_engine(self.vlm, max_batch_size)
        self.job = job
        self.max_batch_size = max_batch_size
        self.workers = max(1, min(threads, 4))

    def __call__(self, batch):
        import pyarrow as pa

        items = [pickle.loads(blob) for blob in batch.column("item").to_pylist()]
        records = list(run_items(self.vlm, self.engine, items, self.job, in_flight=2 * self.max_batch_size,
                                 prefetch=2 * self.workers + 2, workers=self.workers))
        return pa.Table.from_pylist(records, schema=_schema())


def shards_dir(output: Path) -> Path:
    """Where the shards of `output` go: beside it, named after it."""
    return output.with_name(output.name + ".shards")


def _shard_files(folder: Path, fmt: str) -> list[Path]:
    return sorted(folder.glob(f"part-*.{fmt}")) if folder.is_dir() else []


def _done_ids(folder: Path, fmt: str) -> set[str]:
    done: set[str] = set()
    for shard in _shard_files(folder, fmt):
        if fmt == "jsonl":
            done |= read_done(shard)
        else:
            import pyarrow.parquet as pq

            done.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
    return done


class _ShardWriter:
    """Writes each block of records as the next numbered shard, whole or not at all (temporary file + rename)."""

    def __init__(self, folder: Path, fmt: str):
        self.folder, self.fmt = folder, fmt
        folder.mkdir(parents=True, exist_ok=True)
        existing = _shard_files(folder, fmt)
        self.next = int(existing[-1].name.split("-")[1].split(".")[0]) + 1 if existing else 0

    def write(self, table) -> None:
        if table.num_rows == 0:
            return
        path = self.folder / f"part-{self.next:05d}.{self.fmt}"
        tmp = path.with_name("." + path.name + ".tmp")
        if self.fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(dumps(_typed(rec)) for rec in table.to_pylist())
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        os.replace(tmp, path)
        self.next += 1


def _typed(rec: dict[str, Any]) -> dict[str, Any]:
    """A record back from Arrow, in the local job's form (field order, rounding)."""
    return record(rec["id"], rec.get("answer"), rec.get("prompt_tokens"), rec.get("completion_tokens"),
                  rec.get("finish_reason"), rec.get("seconds") or 0.0, rec.get("error"))


def merge_shards(folder: Path, output: Path) -> int:
    """Write every shard of `folder` into `output` (JSONL or Parquet, by its suffix), atomically; return the rows."""
    fmt = "parquet" if output.suffix.lower() == ".parquet" else "jsonl"
    tmp = output.with_name("." + output.name + ".tmp")
    rows = 0
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as out:
            for shard in _shard_files(folder, "jsonl"):
                with open(shard, encoding="utf-8") as f:
                    for line in f:
                        out.write(line)
                        rows += 1
            out.flush()
            os.fsync(out.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(s) for s in _shard_files(folder, "parquet")]
        table = pa.concat_tables(tables) if tables else _schema().empty_table()
        pq.write_table(table, tmp)
        rows = table.num_rows
    os.replace(tmp, output)
    return rows


def _adopt_output(output: Path, folder: Path, fmt: str) -> None:
    """Make the records of an existing output that no shard holds (a local run's, say) a shard of their own.

    The merge at the end rewrites the output from the shards alone; without this, resuming a
    local job with --ray would drop what the local job had finished.
    """
    if not output.is_file():
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    in_shards = _done_ids(folder, fmt)
    if fmt == "parquet":
        table = pq.read_table(output)
        rows = [r for r in table.to_pylist() if r["id"] not in in_shards]
    else:
        read_done(output)  # drops a line cut short by a kill
        with open(output, encoding="utf-8") as f:
            rows = [r for r in map(json.loads, f) if r["id"] not in in_shards]
    if rows:
        _ShardWriter(folder, fmt).write(pa.Table.from_pylist([_typed(r) for r in rows], schema=_schema()))


def _rows(items: Iterator[Item], errors: list[dict]) -> list[dict]:
    """Good items as dataset rows (the item pickled: conversations are ragged); input errors into `errors`."""
    rows = []
    for item in items:
        if item.error is not None:
            errors.append(record(item.id, error=item.error))
        else:
            rows.append({"id": item.id, "item": pickle.dumps(item)})
    return rows


def run_ray(model: str, input_path: str | Path, output: str | Path, job: JobConfig = JobConfig(),
            load_kwargs: dict[str, Any] | None = None, resume: bool = False, overwrite: bool = False,
            replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
            address: str | None = None, max_batch_size: int = 16, batch_size: int = 64,
            progress: bool = True) -> BatchSummary:
    """Answer every item of `input_path` on `replicas` Ray actors; write shards and the merged `output`.

    address: a running cluster to join ("auto", "ray://host:10001", ...); None starts a local Ray
    instance with replicas * cpus_per_replica CPUs, stopped at the end.
    batch_size: items per Ray batch at most (smaller when there are few items, so every replica works).
    """
    ray = _import_ray()
    output = Path(output)
    if address is None:  # replicas run here: find a bad --model now, not once per replica
        model = str(resolve_model_dir(model).absolute())
        read_raw_config(Path(model))
    elif Path(model).exists():
        model = str(Path(model).absolute())  # replicas may not share the driver's working directory
    fmt = "parquet" if output.suffix.lower() == ".parquet" else "jsonl"
    folder = shards_dir(output)
    if resume and overwrite:
        raise OutputError("give --resume or --overwrite, not both.")
    if not resume and (output.exists() or _shard_files(folder, fmt)):
        if not overwrite:
            raise OutputError(f"{str(output)!r} or its shards in {str(folder)!r} already exist; pass --resume to "
                              "continue that job, or --overwrite to start over.")
        output.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    for stale in folder.glob(".part-*.tmp") if folder.is_dir() else ():
        stale.unlink()  # a shard cut short by a kill: its items run again
    if resume:
        _adopt_output(output, folder, fmt)
    done = _done_ids(folder, fmt)
    total = count_items(input_path) if progress else None
    input_errors: list[dict] = []
    rows = _rows((it for it in read_items(input_path, job) if it.id not in done), input_errors)

    started = time.monotonic()
    if address is None:
        # A throwaway local instance: nothing to report anywhere (set the variable to 1 to opt in).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=max(1, math.ceil(replicas * cpus_per_replica)), include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is on stderr already
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        shards = _ShardWriter(folder, fmt)
        bar = Progress(total, skipped=len(done)) if progress else None
        count = errors = 0

        def account(table) -> None:
            nonlocal count, errors
            shards.write(table)
            failed = table.num_rows - table.column("error").null_count
            count += table.num_rows
            errors += failed
            if bar is not None:
                bar.update(table.num_rows, failed)

        try:
            if input_errors:
                import pyarrow as pa

                account(pa.Table.from_pylist(input_errors, schema=_schema()))
            if rows:
                per_batch = max(1, min(batch_size, math.ceil(len(rows) / (2 * replicas))))
                device = "cuda" if gpus_per_replica > 0 else "cpu"
                kwargs = {"device": device, **(load_kwargs or {})}
                ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_batch))
                results = ds.map_batches(
                    _Replica, batch_size=per_batch, batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus_per_replica,
                    num_gpus=gpus_per_replica or None,
                    fn_constructor_kwargs=dict(model=model, load_kwargs=kwargs, job=job,
                                               max_batch_size=max_batch_size,
                                               threads=max(1, math.floor(cpus_per_replica))))
                for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
                    account(table)
        except ray.exceptions.RayError as e:
            raise RayJobError(
                f"the Ray job failed ({type(e).__name__}: {str(e)[-2000:]}); the {count} records received are kept "
                f"in {str(folder)!r}: fix the cause and rerun with --resume."
            ) from e
        finally:
            if bar is not None:
                bar.finish()
        merge_shards(folder, output)
        return BatchSummary(count, errors, len(done), time.monotonic() - started)
    finally:
        ray.shutdown()
