"""The engine: continuous batching over a block-based KV cache, with image-feature and prefix caches.

Every `step()`:
  1. admit waiting requests while the batch has room and the KV pool has blocks for their whole
     answer (prompt + max_new_tokens), reusing cached prefix blocks;
  2. decode one token for every running request, all in one batched forward;
  3. prefill up to PREFILL_CHUNK prompt tokens of the requests still reading their prompts,
     oldest first: their images go through the tower together when they start (features found in
     the image cache are reused), each prompt's uncached suffix runs chunk by chunk, and a request
     whose prompt is complete samples its first token. A long prompt therefore costs the others
     one chunk of latency per step, not its whole prefill.
Requests join and leave at every step; an aborted one frees its blocks before the next step.

Memory: keys and values live in one pool per layer of `num_blocks * BLOCK` slots sized from a
byte budget. A request that could never fit is refused with a clear error; one that does not fit
now waits. Full prompt blocks are registered under a hash of everything before and in them
(token ids, and for image and video positions the content hash of the media), so a later prompt
that starts the same way (the same image, a longer conversation) skips those tokens.

The prefix hash is SHA-256, chained block to block over an unambiguous byte encoding, so two
prompts cannot be made to share a key (Python's `hash()` of tuples can be collided on purpose:
vLLM's CVE-2025-25183). And a hit is verified, not trusted: the pool keeps each block's token keys
and the block it followed, and a lookup whose keys or predecessor differ is a miss. So even a
broken hash could only cost reuse, never serve another prompt's keys and values.

A row whose logits cannot be sampled (NaN or infinite) fails its own request only: its Delta
carries the error, the request is finished and its blocks freed, and the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import threading
import time
from collections import OrderedDict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .. import anyres
from ..errors import GenerationError
from ..model.llava import LlavaModel
from ..model.text import PagedStep
from ..processing.processor import Encoded
from ..processing.prompt import TextTokenizer
from .request import Delta, RequestState
from .sampling import SamplingParams

BLOCK = 16  # tokens per KV block
PREFILL_CHUNK = 2048  # prompt tokens prefilled per step, so long prompts do not stall decoding for long
ROOT_DIGEST = bytes(32)  # the "parent" of a prompt's first block


def block_digest(parent: bytes, keys: tuple) -> bytes:
    """SHA-256 prefix key of one full block: its parent's digest, then each position's token key.

    keys: per position a token id (int) or, at a media placeholder, (media content hash, index).
    Every field is tagged and fixed-width or length-prefixed, so no two key sequences share bytes.
    """
    h = hashlib.sha256(parent)
    for k in keys:
        if isinstance(k, tuple):
            media, index = k
            name = media.encode()
            h.update(b"m" + struct.pack("<I", len(name)) + name + struct.pack("<q", index))
        else:
            h.update(b"t" + struct.pack("<q", k))  # an int or NumPy integer; struct refuses anything else
    return h.digest()


class BlockPool:
    """Free list, reference counts and the verified prefix cache: digest -> block (LRU among unused blocks).

    A registered block also records what it claims to hold: its token keys and the block before it
    (id and that block's generation, which changes whenever the block is handed out again). A
    lookup must match both, so a hit holds exactly the requester's tokens after exactly its prefix.
    """

    def __init__(self, num_blocks: int):
        self.free: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.generation = [0] * num_blocks  # bumped on every allocation: a stale "parent" link stops matching
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        # block -> (its token keys, (parent block, parent's generation) or None for a first block)
        self.claim: dict[int, tuple[tuple, tuple[int, int] | None]] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no request uses, oldest first
        self.num_blocks = num_blocks

    def grow(self, n: int) -> None:
        """Add n fresh blocks (their ids follow the existing ones, so tables stay valid)."""
        self.free.extend(range(self.num_blocks, self.num_blocks + n))
        self.refs.extend([0] * n)
        self.generation.extend([0] * n)
        self.num_blocks += n

    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached but unused)."""
        return len(self.free) + len(self.evictable)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, evicting unused cached blocks oldest first; None when there are not enough."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                self.unpublish(b)
            self.refs[b] = 1
            self.generation[b] += 1
            out.append(b)
        return out

    def _parent(self, parent: int | None) -> tuple[int, int] | None:
        return None if parent is None else (parent, self.generation[parent])

    def lookup(self, h: bytes, keys: tuple, parent: int | None) -> int | None:
        """The cached block under digest `h` holding `keys` right after block `parent` (None: the prompt's
        first block), now referenced by the caller; None on a miss, including a digest collision."""
        b = self.by_hash.get(h)
        if b is None or self.claim[b] != (keys, self._parent(parent)):
            return None
        self.evictable.pop(b, None)
        self.refs[b] += 1
        return b

    def register(self, b: int, h: bytes, keys: tuple, parent: int | None) -> None:
        """Publish a full block under its prefix digest, with the keys it holds and the block before it
        (which the caller holds, so its generation is current). The first block with a digest keeps it."""
        if h not in self.by_hash and b not in self.hash_of:
            self.by_hash[h] = b
            self.hash_of[b] = h
            self.claim[b] = (keys, self._parent(parent))

    def unpublish(self, b: int) -> None:
        """Make block b unfindable (it keeps its references; an unused one is not freed here)."""
        del self.by_hash[self.hash_of.pop(b)]
        del self.claim[b]

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced cached blocks stay findable until evicted."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    self.free.append(b)


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
class _Media:
    """One image or video of a request: its tower inputs, how many placeholders it fills, its hash."""

    kind: str  # "image" | "video"
    pixels: torch.Tensor  # (tiles or frames, 3, S, S)
    size: tuple[int, int]
    tiled: bool
    tokens: int
    key: str


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    media: list[_Media]
    state: RequestState
    token_keys: list  # per prompt position: the token id, or (media hash, index) at placeholders
    blocks: list[int] = field(default_factory=list)
    slot_map: torch.Tensor | None = None  # (tokens it may hold,) pool slot of each position
    length: int = 0  # tokens whose keys/values are in the pool
    registered: int = 0  # full blocks published to the prefix cache
    embeds: torch.Tensor | None = None  # (1, prompt, D) while the prompt is being prefilled in chunks
    last_hash: bytes = ROOT_DIGEST  # digest of the last registered (or reused) block
    aborted: bool = False
    prompt_hashes: list[bytes] = field(default_factory=list)  # chained digest of each full prompt block but the last


def media_of(model: LlavaModel, enc: Encoded) -> list[_Media]:
    """The images and videos of an encoded request, each with its content hash.

    Hashing reads every preprocessed pixel (tens of megabytes for a tiled image): a server calls
    this in a worker thread and hands the result to `add_request`, so the event loop never hashes.
    """
    cfg = model.cfg
    out, start = [], 0
    pixels = None if enc.pixel_values is None else torch.from_numpy(enc.pixel_values)
    for size, tiled in zip(enc.image_sizes, enc.image_tiled):
        n = model.tiles_per_image(size, tiled)
        px = pixels[start : start + n]
        start += n
        tokens = anyres.image_token_count(size, cfg.image_grid_pinpoints, cfg.vision.image_size,
                                          cfg.vision.patches_per_side, cfg.image_features_per_tile, cfg.max_tiles, tiled)
        out.append(_Media("image", px, size, tiled, tokens, _content_key("image", px, size, tiled)))
    start = 0
    frames = None if enc.video_pixels is None else torch.from_numpy(enc.video_pixels)
    for n in enc.video_frames:
        px = frames[start : start + n]
        start += n
        tokens = anyres.video_token_count(n, cfg.vision.patches_per_side)
        out.append(_Media("video", px, (0, 0), False, tokens, _content_key("video", px, (0, 0), False)))
    return out


def _content_key(kind: str, pixels: torch.Tensor, size, tiled: bool) -> str:
    """SHA-256 of exactly what the tower will see: the preprocessed pixels and how they are laid out.

    A full-width cryptographic hash: it keys both the feature cache and the prefix cache, so two
    different images must never be made to share it.
    """
    h = hashlib.sha256()
    h.update(f"{kind}|{size}|{tiled}|{tuple(pixels.shape)}|{pixels.dtype}|".encode())
    h.update(pixels.contiguous().numpy().tobytes())
    return h.hexdigest()


def _token_keys(prompt: list[int], media: list[_Media], image_id: int, video_id: int | None) -> list:
    """Prefix-cache identity of each prompt position: placeholders stand for their media content."""
    queues = {"image": [m for m in media if m.kind == "image"], "video": [m for m in media if m.kind == "video"]}
    keys, current, used = [], None, 0
    for token in prompt:
        kind = "image" if token == image_id else "video" if video_id is not None and token == video_id else None
        if kind is None:
            keys.append(token)
            continue
        if current is None or used == current.tokens or current.kind != kind:
            current, used = queues[kind].pop(0), 0
        keys.append((current.key, used))
        used += 1
    return keys


class Engine:
    """Continuous batching over one loaded model. Not thread-safe by itself: AsyncEngine adds a lock."""

    def __init__(self, model: LlavaModel, tokenizer: TextTokenizer, eos_ids: set[int], config):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.config = config
        text = model.cfg.text
        dtype, device = model.dtype, model.device
        per_token = 2 * text.num_layers * text.num_kv_heads * text.head_dim * torch.finfo(dtype).bits // 8
        budget = config.kv_cache_bytes
        if budget is None:  # room for a full batch of 4k-token requests, at most 2 GiB (a GPU: half its free memory)
            cap = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 2 << 30
            budget = min(config.max_batch_size * min(text.max_position_embeddings, 4096) * per_token, cap)
        self.max_blocks = max(1, budget // (per_token * BLOCK))
        # The pool starts small and grows up to the budget as requests need it: memory follows use.
        start = min(self.max_blocks, 4096 // BLOCK)
        # Zeroed, not empty: padded reads land on real slots, and garbage there could be NaN.
        shape = (start * BLOCK, text.num_kv_heads, text.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(text.num_layers)]
        self.pool = BlockPool(start)
        self.features = FeatureCache(config.image_cache_bytes)
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.by_id: dict[str, _Seq] = {}
        self.counters = dict(prompt_tokens_total=0, generation_tokens_total=0, prefix_cache_hit_tokens=0,
                             requests_finished=0, requests_aborted=0, requests_failed=0, vision_seconds_total=0.0)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, encoded: Encoded, params: SamplingParams,
                    media: list[_Media] | None = None) -> None:
        """Queue a request. Raises GenerationError when it can never fit the context or the KV pool.

        media: `media_of(model, encoded)`, when the caller computed it already (off its event loop).
        """
        if request_id in self.by_id:
            raise GenerationError(f"request id {request_id!r} is already in use.")
        prompt = list(encoded.input_ids)
        context = self.model.cfg.text.max_position_embeddings
        if len(prompt) >= context:
            raise GenerationError(
                f"the prompt holds {len(prompt)} tokens but the model's context is {context}; shorten the "
                "conversation or use fewer or smaller images."
            )
        if params.max_new_tokens > context - len(prompt):  # answers end at the context limit, as "length"
            params = dataclasses.replace(params, max_new_tokens=context - len(prompt))
        need = -(-(len(prompt) + params.max_new_tokens) // BLOCK)
        if need > self.max_blocks:
            raise GenerationError(
                f"the request needs {need * BLOCK} tokens of KV cache but the engine holds "
                f"{self.max_blocks * BLOCK}; lower max_new_tokens or give the engine a larger kv_cache_bytes."
            )
        if media is None:
            media = media_of(self.model, encoded)
        cfg = self.model.cfg
        seq = _Seq(request_id, prompt, media, RequestState.start(params, self.tokenizer, prompt),
                   _token_keys(prompt, media, cfg.image_token_id, cfg.video_token_id))
        self.by_id[request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks return to the pool at the start of the next step."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return
        seq.aborted = True
        self.counters["requests_aborted"] += 1
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass

    def clear_caches(self) -> None:
        """Forget cached image features and prefixes (the next request starts cold)."""
        self.features = FeatureCache(self.config.image_cache_bytes)
        for b in list(self.pool.evictable):
            self.pool.unpublish(b)
            self.pool.evictable.pop(b)
            self.pool.free.append(b)
        for b in list(self.pool.hash_of):  # blocks in use stay, but are no longer findable
            self.pool.unpublish(b)

    def _grow(self, blocks_needed: int) -> bool:
        """Enlarge the pool (at least doubling) so `blocks_needed` more blocks fit; False at the budget."""
        missing = blocks_needed - self.pool.available()
        room = self.max_blocks - self.pool.num_blocks
        if missing <= 0 or missing > room:
            return missing <= 0
        add = min(room, max(missing, self.pool.num_blocks))
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = torch.cat([old, old.new_zeros((add * BLOCK, *old.shape[1:]))])
        self.pool.grow(add)
        return True

    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """Gauges and counters for monitoring."""
        return dict(self.counters, requests_running=len(self.running), requests_waiting=len(self.waiting),
                    image_cache_hits=self.features.hits, image_cache_misses=self.features.misses,
                    image_cache_bytes=self.features.bytes, kv_blocks_total=self.pool.num_blocks,
                    kv_blocks_budget=self.max_blocks,
                    kv_blocks_free=self.pool.available())

    # -- one iteration ------------------------------------------------------------------------------
    def step(self, lock: threading.Lock | None = None) -> list[tuple[str, Delta]]:
        """Advance every running request by one token and start waiting ones; return their deltas.

        With a lock, scheduling and bookkeeping happen under it and the model runs outside it, so
        callers can add and abort requests meanwhile. A request whose logits cannot be sampled gets
        one last Delta with `error` set (finish_reason "error") and is finished; the others go on.
        """
        guard = lock if lock is not None else nullcontext()
        with guard:
            self._reap()
            self._admit()
            decoding = [s for s in self.running if s.state.ids]
            prefilling = [s for s in self.running if not s.state.ids]
        outputs: list[tuple[_Seq, Delta]] = []
        with torch.inference_mode():
            if decoding:
                outputs += self._decode(decoding)
            if prefilling:
                outputs += self._prefill(prefilling)
        with guard:
            result = []
            for seq, delta in outputs:
                if seq.aborted:
                    continue
                result.append((seq.request_id, delta))
                if delta.error is not None:
                    self.counters["requests_failed"] += 1
                else:
                    self.counters["generation_tokens_total"] += 1
                if delta.finish_reason is not None:
                    self._finish(seq)
            self._reap()
            return result

    def _reap(self) -> None:
        for seq in [s for s in self.running if s.aborted]:
            self.running.remove(seq)
            self.pool.release(seq.blocks)
            seq.blocks = []

    def _finish(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self.by_id.pop(seq.request_id, None)
        self.pool.release(seq.blocks)
        seq.blocks = []
        self.counters["requests_finished"] += 1

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            if not seq.prompt_hashes:
                h = ROOT_DIGEST
                for i in range((len(seq.prompt) - 1) // BLOCK):  # the last prompt token always runs: it gives the logits
                    h = block_digest(h, self._block_keys(seq, i))
                    seq.prompt_hashes.append(h)
            hits = []
            for i, h in enumerate(seq.prompt_hashes):
                b = self.pool.lookup(h, self._block_keys(seq, i), hits[-1] if hits else None)
                if b is None:
                    break
                hits.append(b)
                seq.last_hash = h
            if len(hits) < len(seq.prompt_hashes) and seq.prompt_hashes[len(hits)] in self._in_flight():
                # A running request is prefilling this very prefix (requests about one image often arrive
                # together): wait for its blocks instead of computing them a second time.
                self.pool.release(hits)
                break
            total = -(-(len(seq.prompt) + seq.state.params.max_new_tokens) // BLOCK)
            self._grow(total - len(hits))
            fresh = self.pool.allocate(total - len(hits))
            if fresh is None:
                self.pool.release(hits)
                break  # not enough memory now: wait for running requests to finish
            self.waiting.popleft()
            seq.blocks = hits + fresh
            blocks = torch.tensor(seq.blocks)
            seq.slot_map = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()  # (blocks*BLOCK,)
            seq.length = len(hits) * BLOCK
            seq.registered = len(hits)
            if not hits:
                seq.last_hash = ROOT_DIGEST
            self.counters["prefix_cache_hit_tokens"] += len(hits) * BLOCK
            self.counters["prompt_tokens_total"] += len(seq.prompt)
            self.running.append(seq)


    def _in_flight(self) -> set[bytes]:
        """Prefix hashes of prompt blocks that running requests have yet to fill and publish."""
        return {h for seq in self.running if seq.length < len(seq.prompt)
                for h in seq.prompt_hashes[seq.registered:]}

    @staticmethod
    def _block_keys(seq: _Seq, i: int) -> tuple:
        """Token keys of the request's full block i: prompt keys, then generated ids."""
        lo, hi, n = i * BLOCK, (i + 1) * BLOCK, len(seq.token_keys)
        return tuple(seq.token_keys[lo:hi] if hi <= n else seq.token_keys[lo:] + seq.state.ids[max(0, lo - n) : hi - n])

    def _register(self, seq: _Seq) -> None:
        """Publish the request's newly filled blocks to the prefix cache (prompt keys, then generated ids)."""
        while (seq.registered + 1) * BLOCK <= seq.length:
            i = seq.registered
            keys = self._block_keys(seq, i)
            if i < len(seq.prompt_hashes):
                seq.last_hash = seq.prompt_hashes[i]  # computed when the request was admitted
            else:
                seq.last_hash = block_digest(seq.last_hash, keys)
            self.pool.register(seq.blocks[i], seq.last_hash, keys, seq.blocks[i - 1] if i else None)
            seq.registered += 1

    def _media_features(self, seqs: list[_Seq]) -> dict[str, torch.Tensor]:
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
            packed = model.pack_images(tiles, tuple(m.size for m in images), tuple(m.tiled for m in images))
            for m, f in zip(images, packed):
                found[m.key] = f
                self.features.put(m.key, f)
        for m in videos:
            f = model.video_features(m.pixels, (m.pixels.shape[0],))
            found[m.key] = f
            self.features.put(m.key, f)
        if images or videos:
            self.counters["vision_seconds_total"] += time.perf_counter() - started
        return found

    def _prefill(self, seqs: list[_Seq]) -> list[tuple[_Seq, Delta]]:
        """Prefill up to PREFILL_CHUNK prompt tokens, oldest request first; sample where a prompt completes."""
        chosen, budget = [], PREFILL_CHUNK
        for seq in seqs:
            if budget <= 0:
                break
            if not seq.aborted:
                chosen.append((seq, min(budget, len(seq.prompt) - seq.length)))
                budget -= chosen[-1][1]
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
            start, end = seq.length, seq.length + n
            embeds = seq.embeds
            step = PagedStep(
                keys=self.keys, values=self.values,
                write_slots=seq.slot_map[start:end].to(device),
                read_slots=seq.slot_map[None, :end].to(device),
                read_valid=torch.ones(1, end, dtype=torch.bool, device=device),
                query_pos=torch.arange(start, end, device=device)[None],
                plain_causal=True,  # one row, every slot up to `end` valid, the queries are its last positions
            )
            logits = model.decode(embeds[:, start:end], step.query_pos, None, step, last_only=True)[0, -1]
            seq.length = end
            self._register(seq)
            if end == len(seq.prompt):  # the whole prompt is in: its first token
                seq.embeds = None
                done.append((seq, logits))
        if not done:
            return []
        deltas = RequestState.sample_batch([seq.state for seq, _ in done], torch.stack([l for _, l in done]),
                                           self.eos_ids)
        return [(seq, delta) for (seq, _), delta in zip(done, deltas)]

    def _decode(self, seqs: list[_Seq]) -> list[tuple[_Seq, Delta]]:
        device, b = self.model.device, len(seqs)
        longest = max(s.length for s in seqs) + 1  # keys each row reads, the new one included
        # Everything the step needs from the host goes over in one copy: each copy to a GPU is a sync.
        host = torch.zeros(b, longest + 2, dtype=torch.long)  # per row: read slots, keys read, last token
        for i, seq in enumerate(seqs):
            host[i, : seq.length + 1] = seq.slot_map[: seq.length + 1]  # padding reads slot 0, masked out
            host[i, longest] = seq.length + 1
            host[i, longest + 1] = seq.state.ids[-1]
        host = host.to(device)
        read, lengths, tokens = host[:, :longest], host[:, longest], host[:, longest + 1 :]  # (B, S), (B,), (B, 1)
        positions = (lengths - 1)[:, None]  # (B, 1)
        step = PagedStep(keys=self.keys, values=self.values, write_slots=read.gather(1, positions)[:, 0],
                         read_slots=read, read_valid=torch.arange(longest, device=device)[None, :] < lengths[:, None],
                         query_pos=positions, plain_causal=b == 1)
        embeds = self.model.language_model.embed_tokens(tokens)  # (B, 1, D)
        logits = self.model.decode(embeds, positions, None, step, last_only=True)[:, -1]  # (B, V)
        for seq in seqs:
            seq.length += 1
            self._register(seq)
        # One batched pick: a per-row pick would copy a vocabulary row to the host (a GPU sync) per request.
        deltas = RequestState.sample_batch([s.state for s in seqs], logits, self.eos_ids)
        return list(zip(seqs, deltas))
