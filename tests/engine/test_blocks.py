"""The block manager on its own: no model, no torch. Reference counts, prefix sharing, LRU eviction,
running out of blocks, growth within the budget, and hits verified against the tokens they claim."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from llavakit.engine.blocks import (BLOCK, ROOT_DIGEST, BlockManager, BlockPool, BlockTable, block_digest, block_keys,
                                    token_keys)


def _table(prompt: list[int]) -> BlockTable:
    return BlockTable(list(prompt))


def _prefill(blocks: BlockManager, table: BlockTable, generated: list[int] = ()) -> None:
    """What a step does once the runner has written the whole prompt: record it and publish full blocks."""
    table.length = len(table.keys) + len(generated)
    blocks.register(table, list(generated))


def _admit(blocks: BlockManager, table: BlockTable, tokens: int) -> list[int] | None:
    """Admit like the scheduler: cached prefix first, then fresh blocks; the hits, or None when it does not fit."""
    hits = blocks.cached_prefix(table)
    return hits if blocks.allocate(table, hits, tokens) else None


PROMPT = list(range(100, 100 + 3 * BLOCK + 5))  # 3 full blocks and a partial one


def test_block_modules_import_neither_torch_nor_transformers():
    code = ("import sys, llavakit.engine.blocks, llavakit.engine.scheduler; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_allocate_and_release_count_references():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.available() == 1 and [pool.refs[b] for b in a] == [1, 1, 1]
    assert pool.allocate(2) is None and pool.available() == 1  # not enough: nothing handed out
    pool.release(a)
    assert pool.available() == 4 and pool.refs == [0, 0, 0, 0] and not pool.evictable  # unpublished: free


def test_two_prompts_with_a_common_prefix_share_its_blocks():
    blocks = BlockManager(16, 16)
    first = _table(PROMPT)
    assert _admit(blocks, first, len(PROMPT) + 8) == []
    _prefill(blocks, first)
    assert first.registered == 3  # the full blocks are published as soon as they are filled
    second = _table(PROMPT[: 2 * BLOCK] + [7] * 20)  # the same first two blocks, then other tokens
    hits = _admit(blocks, second, len(second.keys) + 8)
    assert hits == first.blocks[:2] and second.blocks[:2] == first.blocks[:2]
    assert second.length == 2 * BLOCK and second.registered == 2
    assert [blocks.pool.refs[b] for b in first.blocks[:3]] == [2, 2, 1]
    assert not set(second.blocks[2:]) & set(first.blocks)  # the rest is its own
    held = first.blocks
    blocks.release(first)
    assert [blocks.pool.refs[b] for b in second.blocks[:2]] == [1, 1]  # still held by the second
    assert list(blocks.pool.evictable) == [held[2]]  # published and unused: cached; the partial block is free
    blocks.release(second)
    assert all(r == 0 for r in blocks.pool.refs) and blocks.pool.available() == 16


def test_the_last_prompt_block_is_never_served_from_the_cache():
    """Its last token must run to give the first logits, so a prompt of whole blocks reuses all but one."""
    blocks = BlockManager(16, 16)
    prompt = list(range(3 * BLOCK))
    first = _table(prompt)
    _admit(blocks, first, len(prompt) + 4)
    _prefill(blocks, first)
    again = _table(prompt)
    assert len(_admit(blocks, again, len(prompt) + 4)) == 2 and again.length == 2 * BLOCK


def test_unused_cached_blocks_are_evicted_oldest_first_and_a_hit_refreshes_them():
    blocks = BlockManager(3, 3)
    tables = [_table([i] * (BLOCK + 1)) for i in range(3)]  # one full block each (then the last token)
    for t in tables:
        assert _admit(blocks, t, BLOCK) == []  # exactly the full block
        t.length = BLOCK
        blocks.register(t, [])
    owner = {t.blocks[0]: i for i, t in enumerate(tables)}
    for t in tables:
        blocks.release(t)
    assert blocks.pool.available() == 3 and not blocks.pool.free  # all cached, none in use
    again = _table(tables[0].keys)  # reuse prompt 0: its block moves to the young end
    assert len(_admit(blocks, again, BLOCK)) == 1
    blocks.release(again)
    assert [owner[b] for b in blocks.pool.evictable] == [1, 2, 0]
    (evicted,) = blocks.pool.allocate(1)
    assert owner[evicted] == 1  # the least recently used
    assert blocks.cached_prefix(_table(tables[1].keys)) == []  # gone from the cache
    assert len(blocks.cached_prefix(_table(tables[2].keys))) == 1  # the others still hit


def test_running_out_of_blocks_refuses_and_gives_the_hits_back():
    blocks = BlockManager(4, 4)
    first = _table(PROMPT)
    _admit(blocks, first, len(PROMPT))  # 4 blocks: the whole pool
    _prefill(blocks, first)
    cached = first.blocks[:3]
    blocks.release(first)
    held = blocks.pool.allocate(1)  # someone else holds one block, so 3 remain
    second = _table(PROMPT[: 2 * BLOCK] + [7] * (2 * BLOCK + 1))  # shares 2 blocks, needs 5 in all
    assert _admit(blocks, second, len(second.keys)) is None
    assert second.blocks == [] and all(blocks.pool.refs[b] == 0 for b in cached)
    assert blocks.pool.available() == 3  # the refused request holds nothing
    blocks.pool.release(held)
    small = _table(PROMPT[: 2 * BLOCK] + [7])
    assert len(_admit(blocks, small, len(small.keys))) == 2  # after the release it fits, with its hits


def test_the_pool_grows_at_least_doubling_up_to_the_budget():
    blocks = BlockManager(2, 9)
    a = _table(list(range(3 * BLOCK)))
    assert _admit(blocks, a, 3 * BLOCK) == [] and blocks.pool.num_blocks == 4  # 2 -> 4, not 2 -> 3
    b = _table(list(range(500, 500 + 4 * BLOCK)))
    assert _admit(blocks, b, 4 * BLOCK) == [] and blocks.pool.num_blocks == 8
    c = _table(list(range(900, 900 + 3 * BLOCK)))
    assert _admit(blocks, c, 3 * BLOCK) is None and blocks.pool.num_blocks == 8  # 2 missing, 1 of budget: no growth
    d = _table(list(range(1300, 1300 + 2 * BLOCK)))
    assert _admit(blocks, d, 2 * BLOCK) == [] and blocks.pool.num_blocks == 9  # capped at the budget
    blocks.release(a)
    assert _admit(blocks, c, 3 * BLOCK) == [] and blocks.pool.num_blocks == 9 and blocks.pool.available() == 0


def test_a_forged_digest_collision_is_a_miss():
    """Every block under one digest: only the tokens (and the block before them) decide a hit."""
    blocks = BlockManager(16, 16, digest=lambda parent, keys: b"\0" * 32)
    first = _table(PROMPT)
    _admit(blocks, first, len(PROMPT))
    _prefill(blocks, first)
    assert len(blocks.pool.by_hash) == 1  # the first block took the digest; the others could not publish
    other = _table([1] * len(PROMPT))
    assert _admit(blocks, other, len(PROMPT)) == []  # same digest, other tokens: a miss
    same = _table(PROMPT)
    assert _admit(blocks, same, len(PROMPT)) == first.blocks[:1]  # the real match still hits


def test_a_digest_blind_to_the_prefix_cannot_misplace_a_block():
    """Equal blocks after different predecessors share a digest of their own tokens; the parent check refuses."""
    blocks = BlockManager(16, 16, digest=lambda parent, keys: repr(keys).encode())
    period = list(range(20, 20 + BLOCK))
    a = _table([1] * BLOCK + period + [5])
    _admit(blocks, a, len(a.keys))
    _prefill(blocks, a)
    b = _table([1] * BLOCK + period + [6, 6])  # the same two blocks: both hit
    assert _admit(blocks, b, len(b.keys)) == a.blocks[:2]
    c = _table(period + period + [5])  # `period` as a first block: its digest finds a's second block, refused
    assert c.prompt_hashes is None and blocks.prompt_hashes(c)[0] in blocks.pool.by_hash
    assert _admit(blocks, c, len(c.keys)) == []


def test_a_stale_parent_does_not_match_after_its_block_was_handed_out_again():
    pool = BlockPool(3)
    first, second = pool.allocate(2)
    pool.register(first, b"h0", (1,), None)
    pool.register(second, b"h1", (2,), first)
    assert pool.lookup(b"h1", (2,), first) == second
    pool.release([first, second])  # `second` is held twice: only `first` becomes unused
    assert pool.allocate(2)[1] == first  # the free block, then `first` evicted: it holds something else now
    pool.register(first, b"h0", (1,), None)  # even claiming the very same tokens again
    assert pool.lookup(b"h1", (2,), first) is None  # `second` followed the old `first`


def test_generated_tokens_publish_their_blocks_for_a_follow_up():
    """An answer's full blocks are published with its ids, so the next turn of the conversation reuses them."""
    blocks = BlockManager(16, 16)
    prompt = list(range(BLOCK + 4))
    answer = list(range(300, 300 + 2 * BLOCK))
    first = _table(prompt)
    _admit(blocks, first, len(prompt) + len(answer))
    _prefill(blocks, first, answer)
    assert first.registered == 3
    assert block_keys(first, 1, answer) == tuple(prompt[BLOCK:] + answer[: BLOCK - 4])
    follow_up = _table(prompt + answer + [9, 9])
    assert _admit(blocks, follow_up, len(follow_up.keys) + 1) == first.blocks[:3]


def test_forget_unpublishes_everything_and_frees_unused_blocks():
    blocks = BlockManager(8, 8)
    a, b = _table(PROMPT), _table(list(range(1, 1 + 2 * BLOCK + 1)))
    for t in (a, b):
        _admit(blocks, t, len(t.keys))
        _prefill(blocks, t)
    blocks.release(a)
    blocks.pool.forget()
    assert not blocks.pool.by_hash and not blocks.pool.evictable and blocks.pool.available() == 8 - len(b.blocks)
    assert blocks.cached_prefix(_table(PROMPT)) == []
    blocks.release(b)
    assert blocks.pool.available() == 8 and not blocks.pool.evictable  # b's blocks were unpublished: free


def test_block_digest_chains_and_tags_every_field():
    d = block_digest(ROOT_DIGEST, (1, 2))
    assert d == block_digest(bytes(32), (1, 2)) and len(d) == 32
    assert len({d, block_digest(d, (1, 2)), block_digest(ROOT_DIGEST, (1, ("2", 0))),
                block_digest(ROOT_DIGEST, (2, 1))}) == 4


def test_token_keys_name_media_positions_by_content():
    image = SimpleNamespace(kind="image", tokens=2, key="img")
    video = SimpleNamespace(kind="video", tokens=1, key="vid")
    keys = token_keys([5, 9, 9, 6, 8, 9, 9], [image, video, SimpleNamespace(kind="image", tokens=2, key="two")],
                      image_id=9, video_id=8)
    assert keys == [5, ("img", 0), ("img", 1), 6, ("vid", 0), ("two", 0), ("two", 1)]
