"""A batch job on this machine: items stream through one continuous-batching engine.

    items ──► encode (threads: decode images, template, tokenize) ──► engine (≤ in_flight) ──► records
               at most `prefetch` ahead                                 finished in any order

Memory stays bounded whatever the job's size: at most `prefetch` encoded items wait and
`in_flight` requests sit in the engine; everything else is still a path on disk. An item that
fails (unreadable image, bad conversation, prompt longer than the context, invalid sampling) gives
an error record and the job goes on. `run_items` is shared with the Ray replicas.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..engine.async_engine import EngineConfig
from ..engine.core import Engine
from ..engine.sampling import SamplingParams
from ..errors import LlavakitError
from .inputs import Item, JobConfig, count_items, read_items, sampling_for
from .output import JsonlWriter, OutputError, Progress, prepare_output, record


@dataclass
class _Running:
    """An item inside the engine and what it has produced so far."""

    item: Item
    started: float
    prompt_tokens: int
    texts: list[str] = field(default_factory=list)
    tokens: int = 0


def _describe(e: BaseException) -> str:
    """An error message for a record: llavakit's own messages stand alone; others say their type."""
    return str(e) if isinstance(e, LlavakitError) else f"{type(e).__name__}: {e}"


def new_engine(vlm, max_batch_size: int = 16) -> Engine:
    """A fresh engine on a loaded VLM, sized for `max_batch_size` requests decoded together."""
    return Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig(max_batch_size=max_batch_size))


def run_items(vlm, engine: Engine, items: Iterable[Item], job: JobConfig, in_flight: int = 32,
              prefetch: int = 8, workers: int = 2) -> Iterator[dict]:
    """Answer items on `engine`; yield one record per item as it finishes (completion order).

    in_flight: requests inside the engine at once (running or waiting for a batch slot).
    prefetch, workers: items encoded ahead of the engine, and the threads encoding them.
    Never raises for a bad item; an engine failure (a bug) fails the requests it was running and
    the job goes on with the next ones.
    """
    source = iter(items)
    exhausted = False
    encoding: deque[tuple[Item, SamplingParams, float, Future]] = deque()
    running: dict[str, _Running] = {}
    serial = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llavakit-batch-encode") as pool:
        while True:
            # 1. read ahead: items are only opened here, `prefetch` at a time
            while not exhausted and len(encoding) < prefetch:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                if item.error is not None:
                    yield record(item.id, error=item.error)
                    continue
                started = time.perf_counter()
                try:
                    params = sampling_for(item, job)
                except Exception as e:
                    yield record(item.id, seconds=time.perf_counter() - started, error=_describe(e))
                    continue
                encoding.append((item, params, started, pool.submit(vlm.processor.encode, item.messages)))
            if not encoding and not running and exhausted:
                return
            # 2. hand encoded items to the engine; wait for one only when the engine has nothing to do
            if not running and encoding and not any(f.done() for *_, f in encoding):
                wait([f for *_, f in encoding], return_when=FIRST_COMPLETED)
            for entry in [e for e in encoding if e[3].done()]:
                if len(running) >= in_flight:
                    break
                encoding.remove(entry)
                item, params, started, future = entry
                try:
                    encoded = future.result()
                except Exception as e:  # ImageError, VideoError, PromptError, ...
                    yield record(item.id, seconds=time.perf_counter() - started, error=_describe(e))
                    continue
                serial += 1
                rid = f"batch-{serial}"
                try:
                    engine.add_request(rid, encoded, params)
                except Exception as e:  # a prompt too long for the context or the KV budget
                    yield record(item.id, prompt_tokens=len(encoded.input_ids),
                                 seconds=time.perf_counter() - started, error=_describe(e))
                    continue
                running[rid] = _Running(item, started, len(encoded.input_ids))
            if not running:
                continue
            # 3. one engine step: a token for every running request
            try:
                outputs = engine.step()
            except Exception as e:  # a bug must fail its requests, not the job
                for rid, run in running.items():
                    engine.abort(rid)
                    yield record(run.item.id, prompt_tokens=run.prompt_tokens,
                                 seconds=time.perf_counter() - run.started, error=f"engine failure: {_describe(e)}")
                running.clear()
                continue
            for rid, delta in outputs:
                run = running.get(rid)
                if run is None:
                    continue
                if delta.error is not None:  # this request's logits turned non-finite; the others go on
                    del running[rid]
                    yield record(run.item.id, prompt_tokens=run.prompt_tokens, completion_tokens=run.tokens,
                                 seconds=time.perf_counter() - run.started, error=_describe(delta.error))
                    continue
                run.texts.append(delta.text)
                run.tokens += 1
                if delta.finish_reason is not None:
                    del running[rid]
                    yield record(run.item.id, "".join(run.texts), run.prompt_tokens, run.tokens,
                                 delta.finish_reason, time.perf_counter() - run.started)


@dataclass(frozen=True)
class BatchSummary:
    """What a finished (or interrupted) job did."""

    done: int  # items answered or failed in this run
    errors: int
    skipped: int  # ids already in the output (--resume)
    seconds: float


def run_local(vlm, input_path: str | Path, output: str | Path, job: JobConfig = JobConfig(), resume: bool = False,
              overwrite: bool = False, max_batch_size: int = 16, workers: int = 2,
              progress: bool = True) -> BatchSummary:
    """Answer every item of a folder, JSONL or Parquet input into a JSONL file, on this machine.

    With `resume`, ids already in `output` are skipped and new records appended; otherwise an
    existing non-empty `output` is refused unless `overwrite`. Every record is on disk once it
    is written, so an interrupted job loses nothing it finished.
    """
    output = Path(output)
    if output.suffix.lower() == ".parquet":
        raise OutputError("a local batch job writes JSONL; Parquet output needs --ray (or convert the JSONL).")
    done = prepare_output(output, resume, overwrite)
    total = count_items(input_path) if progress else None
    items = (it for it in read_items(input_path, job) if it.id not in done)
    bar = Progress(total, skipped=len(done)) if progress else None
    engine = new_engine(vlm, max_batch_size)
    started, count, errors = time.monotonic(), 0, 0
    with JsonlWriter(output) as writer:
        try:
            for rec in run_items(vlm, engine, items, job, in_flight=2 * max_batch_size, prefetch=2 * workers + 2,
                                 workers=workers):
                writer.write(rec)
                failed = int(rec["error"] is not None)
                count += 1
                errors += failed
                if bar is not None:
                    bar.update(1, failed)
        finally:
            if bar is not None:
                bar.finish()
    return BatchSummary(count, errors, len(done), time.monotonic() - started)
