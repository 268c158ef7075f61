"""The model runner: turns a scheduled step into tensors, runs the tower and the language model, samples.

It owns everything that lives on the device: the key/value pool (one tensor per layer of
`num_blocks * BLOCK` slots, slot = block * BLOCK + offset, grown as the block manager grows), the
image-feature cache, and the model calls. It reads each request's block table and never changes
it: the scheduler records what a step computed (`Scheduler.advance`).

A step runs decode rows first, all in one batched forward, then the prompt chunks: the images of
requests starting their prompt go through the tower together (features found in the cache are
reused), and a request whose prompt is complete samples its first token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..anyres import ImageLayout, VideoLayout
from ..model.llava import LlavaModel
from ..model.text import PagedStep
from ..processing.processor import Encoded
from .blocks import BLOCK
from .request import Delta, RequestState
from .scheduler import ScheduledStep, Seq


class FeatureCache:
    """Projected image/video features by content hash, LRU, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes or key in self.items:
            return
        self.items[key] = t
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


@dataclass
class Media:
    """One image or video of a request: its tower inputs, its layout (from the processor), its hash."""

    pixels: torch.Tensor  # (tiles or frames, 3, S, S)
    layout: ImageLayout | VideoLayout
    key: str

    @property
    def kind(self) -> str:
        """"image" or "video"."""
        return "image" if isinstance(self.layout, ImageLayout) else "video"

    @property
    def tokens(self) -> int:
        """Placeholder tokens this medium fills."""
        return self.layout.tokens


def media_of(enc: Encoded) -> list[Media]:
    """The images and videos of an encoded request, each with its content hash.

    Hashing reads every preprocessed pixel (tens of megabytes for a tiled image): a server calls
    this in a worker thread and hands the result to `add_request`, so the event loop never hashes.
    """
    out = []
    for layouts, array in ((enc.image_layouts, enc.pixel_values), (enc.video_layouts, enc.video_pixels)):
        pixels = None if array is None else torch.from_numpy(array)
        start = 0
        for layout in layouts:
            px = pixels[start : start + layout.tiles]
            start += layout.tiles
            out.append(Media(px, layout, _content_key(px, layout)))
    return out


def _content_key(pixels: torch.Tensor, layout: ImageLayout | VideoLayout) -> str:
    """SHA-256 of exactly what the tower will see: the preprocessed pixels and how they are laid out.

    A full-width cryptographic hash: it keys both the feature cache and the prefix cache, so two
    different images must never be made to share it.
    """
    h = hashlib.sha256()
    h.update(f"{layout!r}|{tuple(pixels.shape)}|{pixels.dtype}|".encode())
    h.update(pixels.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_heads(model: LlavaModel) -> int:
    """Key/value heads this process caches per layer: the config's, or under tensor parallelism this
    rank's share (llavakit/parallel), read off the key projection it holds."""
    return model.language_model.layers[0].self_attn.k_proj.out_features // model.cfg.text.head_dim


class LayerPools(list):
    """Per-layer pool tensors: a list that can be weakly referenced (tensor-parallel ranks keep a pool
    for each live one, llavakit/parallel/driver.py) and counts replacements of its tensors in
    `version` (the native decode step points at the tensors again only when it moved)."""

    version = 0

    def __setitem__(self, index, value):
        super().__setitem__(index, value)
        self.version += 1


def kv_budget_blocks(model: LlavaModel, max_batch_size: int, kv_cache_bytes: int | None) -> int:
    """Blocks the key/value pool may grow to: `kv_cache_bytes`, or by default room for a full batch of
    4k-token requests, at most 2 GiB (on a GPU: half its free memory)."""
    text = model.cfg.text
    per_token = 2 * text.num_layers * cache_heads(model) * text.head_dim * torch.finfo(model.dtype).bits // 8
    budget = kv_cache_bytes
    if budget is None:
        device = model.device
        cap = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 2 << 30
        budget = min(max_batch_size * min(text.max_position_embeddings, 4096) * per_token, cap)
    return max(1, budget // (per_token * BLOCK))


class ModelRunner:
    """The device side of the engine: KV pool tensors, feature cache, tower and model calls, sampling."""

    def __init__(self, model: LlavaModel, eos_ids: set[int], num_blocks: int, image_cache_bytes: int):
        self.model = model
        self.eos_ids = eos_ids
        text = model.cfg.text
        # Zeroed, not empty: padded reads land on real slots, and garbage there could be NaN.
        shape = (num_blocks * BLOCK, cache_heads(model), text.head_dim)
        self.keys = LayerPools(torch.zeros(shape, dtype=model.dtype, device=model.device)
                               for _ in range(text.num_layers))
        self.values = LayerPools(torch.zeros(shape, dtype=model.dtype, device=model.device)
                                 for _ in range(text.num_layers))
        self.features = FeatureCache(image_cache_bytes)
        self.vision_seconds = 0.0  # spent in the tower, for monitoring
        self._valid = torch.ones(1, 4096, dtype=torch.bool)  # a lone CPU row's read_valid, sliced

    def reserve(self, num_blocks: int) -> None:
        """Grow the pool tensors to `num_blocks` blocks (new slots zeroed; existing slots keep their place)."""
        add = num_blocks * BLOCK - self.keys[0].shape[0]
        if add > 0:
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    buffers[i] = torch.cat([old, old.new_zeros((add, *old.shape[1:]))])

    def run(self, step: ScheduledStep) -> list[tuple[Seq, Delta]]:
        """Compute one step and sample: a Delta per decode row, and per request whose prompt completed."""
        outputs: list[tuple[Seq, Delta]] = []
        with torch.inference_mode():
            if step.decode:
                outputs += self._decode(step.decode)
            if step.prefill:
                outputs += self._prefill(step.prefill)
        return outputs

    @staticmethod
    def _slots(seq: Seq) -> torch.Tensor:
        """(blocks * BLOCK,) pool slot of each of the request's positions; its blocks never change."""
        if seq.slots is None:
            blocks = torch.tensor(seq.table.blocks)
            seq.slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()  # (blocks*BLOCK,)
        return seq.slots

    def _media_features(self, seqs: list[Seq]) -> dict[str, torch.Tensor]:
        """Features of every image and video of these requests: cached, else one batched tower pass."""
        found, images, videos = {}, [], []
        for seq in seqs:
            for m in seq.media:
                if m.key in found:
                    continue
                hit = self.features.get(m.key)
                if hit is not None:
                    found[m.key] = hit
                elif m.kind == "image":
                    images.append(m)
                else:
                    videos.append(m)
        model = self.model
        started = time.perf_counter()
        if images:
            tiles = model.encode_tiles(torch.cat([m.pixels for m in images]))
            packed = model.pack_images(tiles, tuple(m.layout for m in images))
            for m, f in zip(images, packed):
                found[m.key] = f
                self.features.put(m.key, f)
        for m in videos:
            f = model.video_features(m.pixels, (m.layout,))
            found[m.key] = f
            self.features.put(m.key, f)
        if images or videos:
            self.vision_seconds += time.perf_counter() - started
        return found

    def _prefill(self, chosen: list[tuple[Seq, int]]) -> list[tuple[Seq, Delta]]:
        """Prefill each chosen request's next `n` prompt tokens; sample where a prompt completes."""
        fresh = [seq for seq, _ in chosen if seq.embeds is None]
        features = self._media_features(fresh) if fresh else {}
        model, device, done = self.model, self.model.device, []  # done: (request, its last logits (V,))
        for seq in fresh:
            ids = torch.tensor([seq.prompt], dtype=torch.long)
            images = [features[m.key] for m in seq.media if m.kind == "image"]
            videos = [features[m.key] for m in seq.media if m.kind == "video"]
            seq.embeds = model.embed(ids.to(device), torch.cat(images) if images else None,
                                     torch.cat(videos) if videos else None)  # (1, prompt, D)
        for seq, n in chosen:
            start, end = seq.table.length, seq.table.length + n
            slots = self._slots(seq)
            step = PagedStep(
                keys=self.keys, values=self.values,
                write_slots=slots[start:end].to(device),
                read_slots=slots[None, :end].to(device),
                read_valid=torch.ones(1, end, dtype=torch.bool, device=device),
                query_pos=torch.arange(start, end, device=device)[None],
                plain_causal=True,  # one row, every slot up to `end` valid, the queries are its last positions
            )
            logits = model.decode(seq.embeds[:, start:end], step.query_pos, None, step, last_only=True)[0, -1]
            if end == len(seq.prompt):  # the whole prompt is in: its first token
                seq.embeds = None
                done.append((seq, logits))
        if not done:
            return []
        deltas = RequestState.sample_batch([seq.state for seq, _ in done], torch.stack([l for _, l in done]),
                                           self.eos_ids)
        return [(seq, delta) for (seq, _), delta in zip(done, deltas)]

    def _decode(self, seqs: list[Seq]) -> list[tuple[Seq, Delta]]:
        device, b = self.model.device, len(seqs)
        if b == 1 and device.type == "cpu":
            step, tokens = self._one_row_step(seqs[0])
        else:
            step, tokens = self._batch_step(seqs, device)
        embeds = self.model.language_model.embed_tokens(tokens)  # (B, 1, D)
        logits = self.model.decode(embeds, step.query_pos, None, step, last_only=True)[:, -1]  # (B, V)
        # One batched pick: a per-row pick would copy a vocabulary row to the host (a GPU sync) per request.
        deltas = RequestState.sample_batch([s.state for s in seqs], logits, self.eos_ids)
        return list(zip(seqs, deltas))

    def _one_row_step(self, seq: Seq) -> tuple[PagedStep, torch.Tensor]:
        """(step, tokens (1, 1)) of a lone request on the CPU: views of its slots, no per-step index math.

        A CPU user's chat is this case; each tensor operation here costs ~10 us with the caches cold
        from streaming the weights, a tenth of a millisecond a token in the general path.
        """
        n = seq.table.length + 1  # keys this step reads, the new one included
        slots = seq.slots if seq.slots is not None else self._slots(seq)
        meta = torch.tensor([[n - 1, seq.state.ids[-1]]])  # position, last token
        if self._valid.shape[1] < n:
            self._valid = torch.ones(1, max(n, 2 * self._valid.shape[1]), dtype=torch.bool)
        step = PagedStep(keys=self.keys, values=self.values, write_slots=slots[n - 1 : n], read_slots=slots[None, :n],
                         read_valid=self._valid[:, :n], query_pos=meta[:, :1], plain_causal=True)
        return step, meta[:, 1:]

    def _batch_step(self, seqs: list[Seq], device: torch.device) -> tuple[PagedStep, torch.Tensor]:
        """(step, tokens (B, 1)) of a batch of decode rows, built on the host and sent in one copy."""
        b = len(seqs)
        longest = max(s.table.length for s in seqs) + 1  # keys each row reads, the new one included
        # Everything the step needs from the host goes over in one copy: each copy to a GPU is a sync.
        host = torch.zeros(b, longest + 2, dtype=torch.long)  # per row: read slots, keys read, last token
        for i, seq in enumerate(seqs):
            n = seq.table.length + 1
            slots = seq.slots if seq.slots is not None else self._slots(seq)  # a call only the first time
            host[i, :n] = slots[:n]  # padding reads slot 0, masked out
            host[i, longest] = n
            host[i, longest + 1] = seq.state.ids[-1]
        host = host.to(device)
        read, lengths, tokens = host[:, :longest], host[:, longest], host[:, longest + 1 :]  # (B, S), (B,), (B, 1)
        positions = (lengths - 1)[:, None]  # (B, 1)
        step = PagedStep(keys=self.keys, values=self.values, write_slots=read.gather(1, positions)[:, 0],
                         read_slots=read, read_valid=torch.arange(longest, device=device)[None, :] < lengths[:, None],
                         query_pos=positions, plain_causal=b == 1)
        return step, tokens
