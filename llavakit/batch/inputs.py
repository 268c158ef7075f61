"""The items of a batch job: read lazily from a folder of media, a JSONL file or a Parquet file.

Every source yields `Item`s in a stable order, one per image, line or row. An item holds a
conversation whose media are still paths, URLs or encoded bytes: nothing is decoded here, so a
job over millions of images holds only the few it is answering. An input that cannot become a
request (invalid JSON, no id, an id seen before) is still an item, carrying its error, so the job
records it in the output instead of stopping.

    folder/                    id = path relative to the folder ("cats/01.jpg"), question = --prompt
    requests.jsonl             {"id": "a", "image": "cats/01.jpg", "prompt": "What breed?", "seed": 3}
    requests.parquet           the same columns
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..engine.sampling import SamplingParams
from ..errors import GenerationError, LlavakitError

DEFAULT_PROMPT = "Describe the picture."
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"})
# Per-item fields that override the job's sampling; anything else on a line is ignored.
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")
_INT_FIELDS = ("id", "max_new_tokens", "top_k", "seed")
_REMOTE = ("http://", "https://", "data:")


class BatchInputError(LlavakitError):
    """The input of a batch job cannot be read at all (missing, or of an unknown kind)."""


@dataclass(frozen=True)
class JobConfig:
    """How items become requests: the question and the sampling of items that do not set their own."""

    prompt: str = DEFAULT_PROMPT  # the question asked about each image of a folder, or of a line without one
    prompt_field: str = "prompt"  # the JSONL / Parquet column holding the question
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # with the item's id, the seed of every item that sets none (see item_seed)


@dataclass(frozen=True)
class Item:
    """One request of a batch job, or the reason its input could not become one."""

    id: str
    messages: list[dict] | None  # a Hugging Face conversation, media unloaded; None when `error` is set
    where: str  # where it came from, for messages: "line 12", "row 3", or the file's relative path
    sampling: dict[str, Any] = field(default_factory=dict)  # per-item overrides, checked when the request is built
    error: str | None = None


def item_seed(job_seed: int, item_id: str) -> int:
    """The seed of an item that sets none: a hash of the job's seed and the id.

    Depending only on these two, an answer is the same whatever batch the item ran in, in what
    order items finished, on which Ray replica, or whether the job was resumed.
    """
    digest = hashlib.blake2b(f"{job_seed}\0{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def sampling_for(item: Item, job: JobConfig) -> SamplingParams:
    """The item's sampling: its own fields over the job's; raises GenerationError on invalid values."""
    values = dict(max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_p=job.top_p,
                  top_k=job.top_k, seed=item_seed(job.seed, item.id))
    values.update({k: v for k, v in item.sampling.items() if v is not None})
    if not isinstance(values.get("ignore_eos", False), bool):
        raise GenerationError(f"ignore_eos must be true or false, got {values['ignore_eos']!r}.")
    return SamplingParams(**values)


# ───────────────────────────── sources ─────────────────────────────


def input_kind(path: Path) -> str:
    """"folder", "jsonl" or "parquet"; raises BatchInputError for anything else."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise BatchInputError(f"batch input {str(path)!r} does not exist; give a folder of images, a .jsonl or a .parquet file.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise BatchInputError(f"batch input {str(path)!r} is neither a folder, a .jsonl nor a .parquet file.")


def read_items(path: str | os.PathLike, job: JobConfig = JobConfig()) -> Iterator[Item]:
    """Every item of a folder, JSONL or Parquet input, lazily, in a stable order (ids unique)."""
    path = Path(path).absolute()  # media paths then hold wherever the items are answered (threads, Ray workers)
    kind = input_kind(path)
    if kind == "folder":
        return _folder_items(path, job)
    rows = _jsonl_rows(path) if kind == "jsonl" else _parquet_rows(path)
    return _unique(_row_items(rows, path.parent, job))


def count_items(path: str | os.PathLike) -> int:
    """How many items `read_items` will yield, cheaply (for the progress bar's ETA)."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "folder":
        return sum(1 for _ in _media_files(path))
    if kind == "parquet":
        return _parquet_file(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline still counts


def _media_files(root: Path) -> Iterator[Path]:
    """Images and videos below `root`, recursively, sorted by path within each folder."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()  # walk order is the file system's otherwise
        for name in sorted(files):
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES or suffix in VIDEO_SUFFIXES:
                yield Path(folder, name)


def _folder_items(root: Path, job: JobConfig) -> Iterator[Item]:
    for file in _media_files(root):
        rel = file.relative_to(root).as_posix()
        kind = "video" if file.suffix.lower() in VIDEO_SUFFIXES else "image"
        parts = [{"type": kind, kind: str(file)}, {"type": "text", "text": job.prompt}]
        yield Item(rel, [{"role": "user", "content": parts}], rel)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed row) per non-blank line; a line that is not JSON gives (where, BatchInputError)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"line {number}", json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                yield f"line {number}", BatchInputError(f"line {number} is not valid JSON ({e}).")


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise BatchInputError(
            f"reading Parquet needs pyarrow: pip install pyarrow (or 'llavakit[ray]') ({e})."
        ) from e
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid and friends: not a Parquet file at all
        raise BatchInputError(f"{str(path)!r} is not a readable Parquet file ({type(e).__name__}: {e}).") from e


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    number = 0
    for batch in _parquet_file(path).iter_batches(batch_size=1024):  # row groups stream; the file never loads whole
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


def _row_items(rows: Iterator[tuple[str, Any]], base: Path, job: JobConfig) -> Iterator[Item]:
    for where, row in rows:
        if isinstance(row, Exception):
            yield Item(f"<{where}>", None, where, error=str(row))
            continue
        try:
            yield _row_item(row, where, base, job)
        except LlavakitError as e:
            rid = row.get("id") if isinstance(row, dict) else None
            rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid) else f"<{where}>"
            yield Item(rid, None, where, error=f"{where}: {e}")


def _unique(items: Iterator[Item]) -> Iterator[Item]:
    """Items with ids seen before become errors of their own line (so every output id stays unique)."""
    first: dict[str, str] = {}
    for item in items:
        if item.id in first:
            yield Item(f"<{item.where}>", None, item.where,
                       error=f"{item.where}: duplicate id {item.id!r} (first seen on {first[item.id]}); skipped.")
            continue
        first[item.id] = item.where
        yield item


def _clean(row: dict) -> dict:
    """Plain values: NaN (pandas' null in numeric and object columns) becomes None, and an integral
    float in an integer field an int (pandas stores an integer column with nulls as floats)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and value != value:
            value = None
        elif isinstance(value, float) and key in _INT_FIELDS and value.is_integer():
            value = int(value)
        out[key] = value
    return out


def _row_item(row: Any, where: str, base: Path, job: JobConfig) -> Item:
    """A JSONL line or Parquet row as an item; raises BatchInputError when it cannot be one."""
    if not isinstance(row, dict):
        raise BatchInputError(f"expected a JSON object, found {type(row).__name__}.")
    row = _clean(row)
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise BatchInputError(f"every item needs an 'id' (a non-empty string or an integer), found {rid!r}.")
    sampling = {k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}
    messages = row.get("messages")
    if isinstance(messages, str):  # a Parquet column may hold the conversation as JSON text
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise BatchInputError(f"'messages' is text but not JSON ({e}).") from e
    if messages is not None:
        if not isinstance(messages, list):
            raise BatchInputError(f"'messages' must be a list of messages, found {type(messages).__name__}.")
        return Item(str(rid), [_resolve_message(m, base) for m in messages], where, sampling)
    media = []
    if row.get("image") is not None:
        media.append(("image", row["image"]))
    images = row.get("images")
    if images is not None:
        if not isinstance(images, list):
            raise BatchInputError(f"'images' must be a list, found {type(images).__name__}.")
        media += [("image", im) for im in images]
    if row.get("video") is not None:
        media.append(("video", row["video"]))
    prompt = row.get(job.prompt_field)
    if prompt is None:
        prompt = job.prompt
    if not isinstance(prompt, str):
        raise BatchInputError(f"{job.prompt_field!r} must be a string, found {type(prompt).__name__}.")
    parts = [{"type": kind, kind: _resolve(src, base)} for kind, src in media] + [{"type": "text", "text": prompt}]
    return Item(str(rid), [{"role": "user", "content": parts}], where, sampling)


def _resolve(source: Any, base: Path) -> Any:
    """A media source with relative paths made relative to the input file's folder, not the working directory."""
    if not isinstance(source, str) or source.startswith(_REMOTE):
        return source  # bytes, URLs and data URLs load as they are
    candidate = base / source  # an absolute source stays itself
    if len(source) <= 4096 and (candidate.is_file() or Path(source).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES):
        return str(candidate)  # a missing file then fails with its resolved path in the message
    return source  # base64 text


def _resolve_message(message: Any, base: Path) -> Any:
    """A message with the relative media paths of its parts resolved; anything malformed is left for the processor to refuse."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = []
    for part in message["content"]:
        if isinstance(part, dict) and part.get("type") in ("image", "video"):
            part = {k: _resolve(v, base) if k in ("image", "video", "path", "url") else v for k, v in part.items()}
        parts.append(part)
    return {**message, "content": parts}
