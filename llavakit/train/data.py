"""Training data: JSONL records → conversations → token ids with labels on assistant tokens only.

Two record formats are read (one JSON object per line):

    original LLaVA   {"id", "image": path | [paths], "video": path,
                      "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}, ...]}
    HF messages      {"id", "messages": [{"role", "content": str | [parts]}], "images": [...], "videos": [...]}
                     (parts {"type": "image"} without a payload take the next entry of "images")

Media paths are relative to the JSONL file's folder unless absolute (or `image_folder` is given).

    messages ─► chat template ─► assistant character spans ─► token offsets ─► labels
    placeholders ─► repeated by the image/video token count (labels -100) ─► Example
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..anyres import ImageLayout, VideoLayout
from ..errors import LlavakitError
from ..processing.processor import Media, Processor
from ..processing.processor import collate as pad_batch
from ..processing.prompt import render_template, split_conversation

IGNORE = -100  # label of positions that do not count in the loss (as in transformers and PyTorch)
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(LlavakitError):
    """A training record that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    """One JSONL line, parsed: where it came from and its conversation in HF messages form."""

    path: Path
    line: int
    id: str
    type: str | None
    messages: list[dict]
    # The line's "tags" (strings; anything else there is ignored): conditions an evaluation groups by.
    tags: tuple[str, ...] = ()
    tokens: int = 0  # about how many tokens, images included (the check before training counts them)
    media_tokens: int = 0  # how many of them are its images' and videos' tokens


@dataclass(frozen=True)
class Example:
    """One conversation ready for the model: ids, labels and its media's tower inputs."""

    input_ids: list[int]
    labels: list[int]  # IGNORE except at assistant tokens
    pixel_values: np.ndarray | None  # (tiles, 3, S, S)
    image_layouts: tuple[ImageLayout, ...]
    video_pixels: np.ndarray | None  # (frames, 3, S, S)
    video_layouts: tuple[VideoLayout, ...]
    # Several conversations packed after one shared prefix (packing.py): per token its rope position
    # and segment (0: the prefix); None for one conversation (positions 0, 1, ...).
    positions: list[int] | None = None
    segments: list[int] | None = None

    image_tiled = property(lambda self: tuple(x.tiled for x in self.image_layouts), doc="Per image, whether tiled.")


@dataclass(frozen=True)
class TrainBatch:
    """Right-padded examples. input_ids, labels, attention_mask: (B, T); media as in processing.Batch."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_layouts: tuple[ImageLayout, ...]
    video_pixels: torch.Tensor | None
    video_layouts: tuple[VideoLayout, ...]
    positions: torch.Tensor | None = None  # (B, T) rope positions, when a row packs conversations
    segments: torch.Tensor | None = None  # (B, T) their segments (see packing.py), 0 at padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_tokens(self) -> int:
        """Tokens that count in the loss (labels shifted by one, as the loss sees them)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


# -- reading ----------------------------------------------------------------------------------------
def read_records(path: Path, image_folder: Path | None = None) -> Iterator[Record | DataError]:
    """Every line of a JSONL file as a Record, or a DataError naming the line (never raises for a bad line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training data {path} does not exist.")
    base = image_folder or path.parent
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise DataError("expected a JSON object")
                tags = obj.get("tags")
                tags = tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else ()
                yield Record(path, n, str(obj.get("id", f"line-{n}")), obj.get("type"), to_messages(obj, base), tags)
            except (json.JSONDecodeError, DataError, LlavakitError, TypeError, ValueError) as e:
                yield DataError(f"{path.name} line {n}: {_reason(e)}")


def _reason(e: Exception) -> str:
    text = str(e)
    return text[0].lower() + text[1:] if text else type(e).__name__


def _media(obj: dict, key: str, base: Path) -> list[str]:
    value = obj.get(key)
    if value is None:
        value = obj.get(key + "s")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise DataError(f"{key} entries must be non-empty strings (paths or URLs), got {item!r}")
        is_inline = item.startswith(("http://", "https://", "data:")) or len(item) > 1024
        out.append(item if is_inline or Path(item).is_absolute() else str(base / item))
    return out


def to_messages(obj: dict, base: Path) -> list[dict]:
    """A record in either format → HF messages with media parts in place (paths resolved against `base`)."""
    images, videos = _media(obj, "image", base), _media(obj, "video", base)
    if "conversations" in obj:
        return _from_llava(obj["conversations"], images, videos)
    if "messages" in obj:
        return _from_hf(obj["messages"], images, videos)
    raise DataError("a record needs 'conversations' (LLaVA format) or 'messages' (HF format)")


def _from_llava(turns: Any, images: list[str], videos: list[str]) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' must be a non-empty list")
    found = sum(str(t.get("value", "")).count("<image>") for t in turns if isinstance(t, dict))
    found_v = sum(str(t.get("value", "")).count("<video>") for t in turns if isinstance(t, dict))
    if found != len(images) and not (found == 0 and images):
        raise DataError(f"the conversation has {found} <image> marker(s) but the record lists {len(images)} image(s)")
    if found_v != len(videos) and not (found_v == 0 and videos):
        raise DataError(f"the conversation has {found_v} <video> marker(s) but the record lists {len(videos)} video(s)")
    queue = {"<image>": list(images), "<video>": list(videos)}
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in ROLE_OF or not isinstance(t.get("value"), str):
            raise DataError(f"turn {i} must be {{'from': 'human'|'gpt'|'system', 'value': str}}")
        role = ROLE_OF[t["from"]]
        text = t["value"]
        # LLaVA's own data sometimes lists media without a marker: they go before the first user text.
        lead = []
        if role == "user" and not any(m["role"] == "user" for m in messages):
            if found == 0:
                lead += [{"type": "image", "image": p} for p in queue["<image>"]]
                queue["<image>"] = []
            if found_v == 0:
                lead += [{"type": "video", "video": p} for p in queue["<video>"]]
                queue["<video>"] = []
        messages.append({"role": role, "content": lead + _split_markers(text, queue)})
    return messages


def _split_markers(text: str, queue: dict[str, list[str]]) -> list[dict]:
    """Text with <image>/<video> markers → parts; a marker's following newline belongs to the marker."""
    parts: list[dict] = []
    rest = text
    while True:
        hits = [(rest.find(m), m) for m in queue if m in rest]
        if not hits:
            break
        at, marker = min(hits)
        if rest[:at].strip():
            parts.append({"type": "text", "text": rest[:at].rstrip("\n")})
        kind = "image" if marker == "<image>" else "video"
        parts.append({"type": kind, kind: queue[marker].pop(0)})
        rest = rest[at + len(marker):]
        if rest.startswith("\n"):
            rest = rest[1:]
    if rest or not parts:
        parts.append({"type": "text", "text": rest})
    return parts


def _from_hf(messages: Any, images: list[str], videos: list[str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    queue = {"image": list(images), "video": list(videos)}
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} must be {{'role': ..., 'content': ...}}")
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind in queue and not any(k in p for k in ("image", "video", "path", "url", "base64")):
                    if not queue[kind]:
                        raise DataError(f"message {i} has more {kind} parts than the record lists {kind}s")
                    p = {"type": kind, kind: queue[kind].pop(0)}
                parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    for kind, left in queue.items():
        if left:
            raise DataError(f"the record lists {len(left)} more {kind}(s) than its messages have {kind} parts")
    return out


# -- encoding -------------------------------------------------------------------------------------
def assistant_spans(proc: Processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant answer in it.

    A span runs from the end of the prompt that asks for that answer (the template with
    add_generation_prompt) to the end of the answer's turn, trailing whitespace excluded; it therefore
    includes the end-of-turn token the model must learn to produce.
    """
    conv = split_conversation(messages)
    msgs, tokens = conv.messages, proc.tokenizer.special_tokens()
    full = render_template(proc.chat_template, msgs, False, tokens)
    spans, answers = [], []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render_template(proc.chat_template, msgs[:i], True, tokens) if i else ""
        upto = render_template(proc.chat_template, msgs[: i + 1], False, tokens)
        if not full.startswith(upto):
            raise DataError("the chat template renders a conversation's prefix differently from the whole; "
                            "labels cannot be placed (use a template whose turns only append text)")
        start = len(before)
        if not upto.startswith(before):
            # Some published templates write the turn header differently when asking for an answer
            # (llava-onevision's "assistant\n" vs "assistant \n" in a rendered turn): the answer then
            # starts where its own text does, after everything the earlier turns rendered.
            earlier = len(render_template(proc.chat_template, msgs[:i], False, tokens)) if i else 0
            text = next((p["text"] for p in m["content"] if p.get("type") == "text" and p["text"].strip()), "")
            start = upto.find(text.strip(), earlier) if text.strip() else -1
            if start < 0:
                raise DataError("the chat template changes the prompt when an answer follows and the answer's "
                                "text is not found verbatim; labels cannot be placed")
        end = len(upto.rstrip())
        if end > start:
            spans.append((start, end))
            answers.append("".join(p["text"] for p in m["content"] if p.get("type") == "text").strip())
    if not spans:
        raise DataError("the conversation has no assistant answer to learn from")
    return _close_turns(proc, full, spans, answers)


def _close_turns(proc: Processor, text: str, spans: list[tuple[int, int]],
                 answers: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Append the EOS token to answers the template leaves open, so that the model learns to stop.

    A template closes an answer when it writes anything after the answer's text (<|im_end|>, </s>,
    a separator); llava-1.5's ends an answer with a space only, where the original LLaVA recipe
    trains on "</s>".
    """
    eos = proc.tokenizer.eos_token
    if not eos:
        return text, spans
    out, new_spans, last, shift = [], [], 0, 0
    for (start, end), answer in zip(spans, answers):
        added = eos if answer and text[start:end].endswith(answer) else ""
        out += [text[last:end], added]
        new_spans.append((start + shift, end + shift + len(added)))
        shift += len(added)
        last = end
    out.append(text[last:])
    return "".join(out), new_spans


def encode_example(proc: Processor, messages: list[dict], max_length: int | None = None,
                   media: Example | None = None) -> Example:
    """Token ids and labels of one conversation, with its media preprocessed (raises DataError).

    media: an example of the same media (same sources, details and order: `packing.media_key`),
    whose preprocessed media this one reuses instead of loading them again.
    """
    text, spans = assistant_spans(proc, messages)
    conv = split_conversation(messages)
    # ids exactly as inference would tokenize them
    if media is not None:
        enc = proc.encode_with_media(text, Media(media.pixel_values, media.image_layouts, media.video_pixels,
                                                 media.video_layouts))
    else:
        enc = proc.encode_prompt(text, conv.images, conv.videos, image_details=conv.image_details)
    labels = _labels(proc, text, spans, enc)
    if max_length is not None and len(enc.input_ids) > max_length:
        raise DataError(f"{len(enc.input_ids)} tokens after tokenization, more than --max-length {max_length}")
    if all(v == IGNORE for v in labels[1:]):
        raise DataError("no assistant token survives tokenization")
    return Example(enc.input_ids, labels, enc.pixel_values, enc.image_layouts, enc.video_pixels, enc.video_layouts)


def _labels(proc: Processor, text: str, spans: list[tuple[int, int]], enc) -> list[int]:
    """Labels for the encoded ids: a token is a target when its characters lie inside an answer span.

    The rendered text (one placeholder per medium) is tokenized with character offsets; each
    placeholder is then repeated by its medium's token count, which changes no other token, and the
    result must equal the ids inference builds.
    """
    tok, m = proc.tokenizer, proc.model
    if proc.original:
        compact, offsets = _chunk_offsets(proc, text)
    else:
        add_special = not (tok.bos_token and text.startswith(tok.bos_token))
        encoding = tok.tok.encode(text, add_special_tokens=add_special)
        compact, offsets = encoding.ids, encoding.offsets
    runs = {m.image_token_id: [x.tokens for x in enc.image_layouts]}
    if m.video_token_id is not None:
        runs[m.video_token_id] = [x.tokens for x in enc.video_layouts]
    ids, labels = [], []
    for i, (a, b) in zip(compact, offsets):
        if i in runs and runs[i]:
            n = runs[i].pop(0)
            ids += [i] * n
            labels += [IGNORE] * n
            continue
        ids.append(i)
        labels.append(i if any(s <= a < b <= e for s, e in spans) else IGNORE)
    if ids != list(enc.input_ids):
        raise DataError("tokenization with offsets disagrees with the prompt's ids; cannot place labels")
    return labels


def _chunk_offsets(proc: Processor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and offsets of the original format's chunk-by-chunk tokenization (one id per placeholder)."""
    tok, m = proc.tokenizer, proc.model
    marks = {t: i for t, i in ((tok.image_token, m.image_token_id), (tok.video_token, m.video_token_id))
             if i is not None}
    pieces = re.split("(" + "|".join(re.escape(t) for t in marks) + ")", text)
    bos = tok.token_id(tok.bos_token)
    ids, offsets, pos, skip = [], [], 0, 0
    for n, piece in enumerate(pieces):
        if n % 2:
            ids.append(marks[piece])
            offsets.append((pos, pos + len(piece)))
        else:
            enc = tok.tok.encode(piece, add_special_tokens=True)
            if n == 0:
                skip = 1 if enc.ids and bos is not None and enc.ids[0] == bos else 0
                start = 0
            else:
                start = skip
            ids += enc.ids[start:]
            offsets += [(pos + a, pos + b) for a, b in enc.offsets[start:]]
        pos += len(piece)
    return ids, offsets


def collate(examples: list[Example], pad_token_id: int) -> TrainBatch:
    """Right-pad examples into a batch (labels IGNORE at padding); the padding is processing's collate."""
    batch = pad_batch(examples, pad_token_id, pad_left=False)
    labels = torch.full(tuple(batch.input_ids.shape), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    positions = segments = None
    if any(e.segments is not None for e in examples):
        positions, segments = torch.zeros_like(labels), torch.zeros_like(labels)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            positions[row, :n] = torch.tensor(e.positions) if e.positions is not None else torch.arange(n)
            if e.segments is not None:
                segments[row, :n] = torch.tensor(e.segments)
    return TrainBatch(
        input_ids=batch.input_ids, labels=labels, attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values, image_layouts=batch.image_layouts,
        video_pixels=batch.video_pixels, video_layouts=batch.video_layouts, positions=positions, segments=segments,
    )
