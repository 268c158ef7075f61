"""The block manager: which KV blocks each request holds, and the verified prefix cache. Pure Python.

Keys and values live in a pool of `BLOCK`-token blocks (the runner owns the tensors; this module
only hands out block ids). A request holds a `BlockTable`: its blocks, how many of its tokens are
in them, how many full blocks it has published.

Full blocks are published under a hash of everything before and in them (token ids, and for image
and video positions the content hash of the media), so a later prompt that starts the same way
(the same image, a longer conversation) skips those tokens:

    prompt:  [ block 0 ][ block 1 ][ block 2 ][ last, partial block: always recomputed ]
    digest:    d0 = H(ROOT, keys0)   d1 = H(d0, keys1)   d2 = H(d1, keys2)

The hash is SHA-256, chained block to block over an unambiguous byte encoding, so two prompts cannot
be made to share a key (Python's `hash()` of tuples can be collided on purpose: vLLM's
CVE-2025-25183). And a hit is verified, not trusted: the pool keeps each block's token keys and the
block it followed, and a lookup whose keys or predecessor differ is a miss. So even a broken hash
could only cost reuse, never serve another prompt's keys and values.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

BLOCK = 16  # tokens per KV block
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


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // BLOCK)


def token_keys(prompt: list[int], media: list, image_id: int, video_id: int | None) -> list:
    """Prefix-cache identity of each prompt position: placeholders stand for their media content.

    media: the request's images and videos in prompt order, each with `kind` ("image" | "video"),
    `tokens` (placeholders it fills) and `key` (its content hash).
    """
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

    def forget(self) -> None:
        """Unpublish every block: unused cached ones become free, blocks in use stay with their requests."""
        for b in self.evictable:
            self.unpublish(b)
            self.free.append(b)
        self.evictable.clear()
        for b in list(self.hash_of):
            self.unpublish(b)


@dataclass(eq=False)
class BlockTable:
    """One request's KV blocks: which ones, how full, how many are published to the prefix cache.

    Blocks are fixed from admission to release: the whole answer is reserved up front.
    """

    keys: list  # per prompt position its prefix identity (`token_keys`); len(keys) is the prompt length
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys/values are in the pool
    registered: int = 0  # full blocks published to the prefix cache
    last_hash: bytes = ROOT_DIGEST  # digest of the last registered (or reused) block
    prompt_hashes: list[bytes] | None = None  # chained digest of each full prompt block but the last


class BlockManager:
    """Hands out blocks to requests within a budget, and shares published prefix blocks between them.

    The pool starts at `start_blocks` and grows (at least doubling) up to `max_blocks` as requests
    need it, so memory follows use; the runner grows its tensors to `pool.num_blocks` before a step.
    `digest` is the chained prefix hash (`block_digest`); tests hand in broken ones to show that
    verification alone keeps every hit correct.
    """

    def __init__(self, start_blocks: int, max_blocks: int,
                 digest: Callable[[bytes, tuple], bytes] = block_digest):
        self.pool = BlockPool(start_blocks)
        self.max_blocks = max_blocks
        self.digest = digest

    def prompt_hashes(self, table: BlockTable) -> list[bytes]:
        """Digests of the prompt's full blocks but the last (its last token always runs: it gives the
        logits), computed once per request."""
        if table.prompt_hashes is None:
            h, out = ROOT_DIGEST, []
            for i in range((len(table.keys) - 1) // BLOCK):
                h = self.digest(h, block_keys(table, i, ()))
                out.append(h)
            table.prompt_hashes = out
        return table.prompt_hashes

    def cached_prefix(self, table: BlockTable) -> list[int]:
        """The longest run of the prompt's first blocks found in the cache, now referenced by the caller
        (hand them to `allocate`, or back with `pool.release`)."""
        hits: list[int] = []
        for i, h in enumerate(self.prompt_hashes(table)):
            b = self.pool.lookup(h, block_keys(table, i, ()), hits[-1] if hits else None)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate(self, table: BlockTable, hits: list[int], tokens: int) -> bool:
        """Give the request blocks for `tokens` tokens: the cached prefix `hits`, then fresh ones (growing
        the pool within the budget, evicting unused cached blocks oldest first). False, with the hits
        released, when there are not enough now."""
        need = blocks_for(tokens) - len(hits)
        self._grow(need)
        fresh = self.pool.allocate(need)
        if fresh is None:
            self.pool.release(hits)
            return False
        table.blocks = hits + fresh
        table.length = len(hits) * BLOCK
        table.registered = len(hits)
        table.last_hash = table.prompt_hashes[len(hits) - 1] if hits else ROOT_DIGEST
        return True

    def _grow(self, need: int) -> None:
        """Enlarge the pool (at least doubling) so `need` more blocks fit, if the budget allows."""
        missing = need - self.pool.available()
        room = self.max_blocks - self.pool.num_blocks
        if 0 < missing <= room:
            self.pool.grow(min(room, max(missing, self.pool.num_blocks)))

    def register(self, table: BlockTable, generated: list[int]) -> None:
        """Publish the request's newly filled full blocks (prompt keys, then the `generated` ids)."""
        while (table.registered + 1) * BLOCK <= table.length:
            i = table.registered
            keys = block_keys(table, i, generated)
            if i < len(table.prompt_hashes):
                table.last_hash = table.prompt_hashes[i]  # computed when the request was admitted
            else:
                table.last_hash = self.digest(table.last_hash, keys)
            self.pool.register(table.blocks[i], table.last_hash, keys, table.blocks[i - 1] if i else None)
            table.registered += 1

    def release(self, table: BlockTable) -> None:
        """Return the request's blocks; published ones stay findable until evicted."""
        self.pool.release(table.blocks)
        table.blocks = []


def block_keys(table: BlockTable, i: int, generated: list[int]) -> tuple:
    """Token keys of the request's full block i: prompt keys, then generated ids."""
    lo, hi, n = i * BLOCK, (i + 1) * BLOCK, len(table.keys)
    if hi <= n:
        return tuple(table.keys[lo:hi])
    return tuple(table.keys[lo:] + generated[max(0, lo - n) : hi - n])
