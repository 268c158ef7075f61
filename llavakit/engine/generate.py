"""Batched generation over a left-padded batch: one prefill, then KV-cached decode steps.

Each row keeps its own sampling parameters, random generator, stop conditions and streaming
detokenizer; a finished row stops emitting while the others go on. Positions come from the
attention mask, so a padded row generates exactly what it generates alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import dataclasses

import torch

from ..errors import GenerationError
from ..model.llava import LlavaModel
from ..model.text import KVCache
from ..processing.processor import Batch
from ..processing.prompt import StreamDecoder, TextTokenizer
from .sampling import SamplingParams, sample_row


@dataclass
class Delta:
    """What one row produced in one step: a token and the text it completed (maybe empty)."""

    row: int
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length" on the row's last step


@dataclass
class _Row:
    params: SamplingParams
    decoder: StreamDecoder
    seen: list[int]
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""  # all text so far, stop strings included
    emitted: int = 0  # characters of `text` already handed out
    done: bool = False


def _stop_cut(row: _Row) -> tuple[int | None, int]:
    """(index where a stop string starts or None, characters to hold back as a possible stop prefix)."""
    stops = row.params.stop
    if not stops:
        return None, 0
    hits = [i for i in (row.text.find(s, max(0, row.emitted - len(s))) for s in stops) if i >= 0]
    if hits:
        return min(hits), 0
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(row.text)), 0, -1):
            if row.text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return None, hold


def _advance(row: _Row, token: int, eos_ids: set[int]) -> Delta:
    """Record one sampled token for a row and decide whether the row is finished."""
    row.ids.append(token)
    row.seen.append(token)
    is_eos = token in eos_ids and not row.params.ignore_eos
    if not is_eos:
        row.text += row.decoder.push(token)
    stop_at, hold = _stop_cut(row)
    reason = None
    if is_eos or stop_at is not None:
        reason = "stop"
    elif len(row.ids) >= row.params.max_new_tokens:
        reason = "length"
    if reason is not None:
        row.done = True
        if stop_at is None:
            row.text += row.decoder.flush()
        end = stop_at if stop_at is not None else len(row.text)
        row.text = row.text[:end]
    else:
        end = len(row.text) - hold
    piece = row.text[row.emitted : max(end, row.emitted)]
    row.emitted = max(end, row.emitted)
    return Delta(row=-1, token_id=token, text=piece, finish_reason=reason)


def embed_batch(model: LlavaModel, batch: Batch) -> torch.Tensor:
    """Input embeddings (B, T, D) of a prepared batch, image and video features in place."""
    return model.embed_inputs(batch.input_ids, batch.pixel_values, batch.image_sizes, batch.image_tiled,
                              batch.video_pixels, batch.video_frames)


def generate(
    model: LlavaModel,
    tokenizer: TextTokenizer,
    batch: Batch,
    params: list[SamplingParams],
    eos_ids: set[int],
) -> Iterator[list[Delta]]:
    """Yield, after every step, the deltas of the rows still running (row indices into the batch)."""
    ids, mask = batch.input_ids, batch.attention_mask
    b, t = ids.shape
    device = model.lm_head.weight.device
    rows = []
    for i, p in enumerate(params):
        g = None
        if p.seed is not None:
            g = torch.Generator(device="cpu")
            g.manual_seed(p.seed)
        seen = ids[i][mask[i].bool()].tolist()
        rows.append(_Row(params=p, decoder=StreamDecoder(tokenizer), seen=seen, generator=g))
    context = model.cfg.text.max_position_embeddings
    if t >= context:
        raise GenerationError(
            f"the prompt holds {t} tokens but the model's context is {context}; shorten the conversation "
            "or use fewer or smaller images."
        )
    # Answers end at the context limit at the latest, with finish_reason "length".
    params = [dataclasses.replace(p, max_new_tokens=min(p.max_new_tokens, context - t)) for p in params]
    for row, p in zip(rows, params):
        row.params = p
    budget = max(p.max_new_tokens for p in params)
    # The cache starts small and grows, so a large max_new_tokens costs memory only when used.
    cache = KVCache.allocate(model.cfg.text, b, t + min(budget, 256), model.lm_head.weight.dtype, device)
    # Padding needs a key mask; an unpadded batch uses the causal fast path.
    padded = bool((mask == 0).any())
    valid = torch.ones(b, t + budget, dtype=torch.bool, device=device) if padded else None
    if padded:
        valid[:, :t] = mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    with torch.inference_mode():
        embeds = embed_batch(model, batch)
        logits = model.decode(embeds, positions.to(device), valid, cache, last_only=True)[:, -1]  # (B, V)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        for _ in range(budget):
            step = []
            tokens = torch.zeros(b, 1, dtype=torch.long)
            for i, row in enumerate(rows):
                if row.done:
                    continue
                seen = torch.tensor(row.seen, dtype=torch.long)
                tok = sample_row(logits[i], row.params, seen, row.generator)
                tokens[i, 0] = tok
                delta = _advance(row, tok, eos_ids)
                delta.row = i
                step.append(delta)
            if step:
                yield step
            if all(r.done for r in rows):
                return
            cache.reserve(cache.length + 1)
            embeds = model.language_model.embed_tokens(tokens.to(device))  # (B, 1, D)
            logits = model.decode(embeds, next_pos.to(device), valid, cache, last_only=True)[:, -1]
            next_pos = next_pos + 1
