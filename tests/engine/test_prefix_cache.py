"""The prefix cache: SHA-256 keys over an unambiguous encoding, and hits verified against the tokens
(and the block before them) they claim to hold, so even a broken digest never serves another prompt."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

import llavakit.engine.core as core
from llavakit.engine.async_engine import EngineConfig
from llavakit.engine.core import BLOCK, ROOT_DIGEST, BlockPool, Engine, block_digest
from llavakit.engine.sampling import SamplingParams
from llavakit.processing.processor import Encoded

PERIOD = list(range(20, 20 + BLOCK))  # one block of text tokens, repeated to make blocks with equal keys
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


def _text(ids: list[int]) -> Encoded:
    return Encoded(prompt="", input_ids=ids, pixel_values=None, image_layouts=(), video_pixels=None,
                   video_layouts=())


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _engine(vlm) -> Engine:
    return Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig())


def _answer(engine: Engine, enc: Encoded, params: SamplingParams = PARAMS) -> tuple[list[int], int]:
    """(tokens, prompt tokens served from the prefix cache) of one request run to the end."""
    before = engine.stats()["prefix_cache_hit_tokens"]
    engine.add_request(f"r{id(enc)}-{before}", enc, params)
    got = []
    while engine.has_unfinished():
        got += [d.token_id for _, d in engine.step()]
    return got, engine.stats()["prefix_cache_hit_tokens"] - before


def _alone(vlm, enc: Encoded) -> list[int]:
    return _answer(_engine(vlm), enc)[0]


def test_block_digest_is_unambiguous_and_stable():
    a = block_digest(ROOT_DIGEST, (1, 2, 3))
    assert len(a) == 32 and a == block_digest(bytes(32), (1, 2, 3))  # no per-process salt, unlike hash()
    others = [
        block_digest(ROOT_DIGEST, (1, 2, 4)),
        block_digest(a, (1, 2, 3)),  # the same tokens after another prefix
        block_digest(ROOT_DIGEST, (1, ("2", 0), 3)),  # a media position is not a token id
        block_digest(ROOT_DIGEST, (1, ("ab", 1), 3)),
        block_digest(ROOT_DIGEST, (1, ("a", 1), 3)),
        block_digest(ROOT_DIGEST, (1, ("ab", 2), 3)),
        block_digest(ROOT_DIGEST, (-1, 2, 3)),
    ]
    assert len({a, *others}) == len(others) + 1


def test_pool_lookup_checks_keys_parent_and_parent_generation():
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    k0, k1 = (1, 2), (3, 4)
    pool.register(first, b"h0", k0, None)
    pool.register(second, b"h1", k1, first)
    assert pool.lookup(b"h0", (1, 5), None) is None  # the digest matches, the tokens do not
    assert pool.lookup(b"h1", k1, None) is None  # the right tokens, but not as a first block
    assert pool.lookup(b"h0", k0, None) == first and pool.lookup(b"h1", k1, first) == second
    pool.release([first, second, first, second])
    assert pool.available() == 4
    # Handing `first` out again (evicted: oldest unused) changes what it holds: its old child must not
    # match behind it, even if it were registered again under a colliding digest.
    pool.allocate(2)  # the two free blocks
    (again,) = pool.allocate(1)
    assert again == first and b"h0" not in pool.by_hash
    pool.register(again, b"h0", k0, None)
    assert pool.lookup(b"h0", k0, None) == again
    assert pool.lookup(b"h1", k1, again) is None


def test_prefix_reuse_still_hits(models):
    vlm = models("llama")[0]
    prompt = [1] + [10] * (BLOCK - 1) + PERIOD * 6  # 7 full blocks: all registered once the prompt is in
    longer = prompt + PERIOD + [30, 31]
    engine = _engine(vlm)
    first, hit = _answer(engine, _text(prompt))
    assert hit == 0 and first == _alone(vlm, _text(prompt))
    second, hit = _answer(engine, _text(longer))
    assert hit == 7 * BLOCK and second == _alone(vlm, _text(longer))
    # images: a follow-up about the same picture reuses it
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(3, 60, 40)},
                                         {"type": "text", "text": "What is in the picture?"}]}]
    enc = vlm.processor.encode(conv)
    _answer(engine, enc)
    again, hit = _answer(engine, enc)
    assert hit == (len(enc.input_ids) - 1) // BLOCK * BLOCK and again == _alone(vlm, enc)


def test_constant_digest_never_reuses_other_tokens(models, monkeypatch):
    vlm = models("llama")[0]
    a = [1] + [10] * (BLOCK - 1) + PERIOD * 6
    b = [1] + [11] * (BLOCK - 1) + PERIOD * 6  # another first block
    c = a + [40, 41, 42]
    convs = [[{"role": "user", "content": [{"type": "image", "image": _image(seed, 60, 40)},
                                           {"type": "text", "text": "What is in the picture?"}]}] for seed in (4, 5)]
    images = [vlm.processor.encode(conv) for conv in convs]
    want = {name: _alone(vlm, enc) for name, enc in
            [("a", _text(a)), ("b", _text(b)), ("c", _text(c)), ("i0", images[0]), ("i1", images[1])]}
    monkeypatch.setattr(core, "block_digest", lambda parent, keys: b"\0" * 32)  # every block collides
    engine = _engine(vlm)
    assert _answer(engine, _text(a)) == (want["a"], 0)
    assert _answer(engine, _text(b)) == (want["b"], 0)  # a's first block claims other tokens: a miss
    assert _answer(engine, _text(c)) == (want["c"], BLOCK)  # a's first block is c's; the next claims fail
    # two pictures: wherever their keys differ, the colliding block is refused
    engine = _engine(vlm)
    assert _answer(engine, images[0]) == (want["i0"], 0)
    got, hit = _answer(engine, images[1])
    keys = [core._token_keys(enc.input_ids, core.media_of(enc), vlm.config.image_token_id, None)
            for enc in images]
    same = next(i for i in range(len(keys[1])) if keys[0][i] != keys[1][i]) // BLOCK  # whole blocks in common
    assert got == want["i1"] and hit <= min(same, 1) * BLOCK


def test_digest_blind_to_the_prefix_cannot_misplace_blocks(models, monkeypatch):
    """A digest of a block's own tokens only: equal blocks at other positions, or after other tokens,
    share a digest; the pool's parent check refuses them."""
    vlm = models("llama")[0]
    a = [1] + [10] * (BLOCK - 1) + PERIOD * 6
    b = [1] + [10] * (BLOCK - 1) + PERIOD * 8 + [30, 31]
    d = [1] + PERIOD * 3  # starts like none of them, then the same blocks
    want = {name: _alone(vlm, _text(ids)) for name, ids in [("a", a), ("b", b), ("d", d)]}
    monkeypatch.setattr(core, "block_digest", lambda parent, keys: hashlib.sha256(repr(keys).encode()).digest())
    engine = _engine(vlm)
    assert _answer(engine, _text(a)) == (want["a"], 0)
    # b's blocks 2.. share the digest of a's block 1, which sits after another block: only 0 and 1 are reused
    assert _answer(engine, _text(b)) == (want["b"], 2 * BLOCK)
    assert _answer(engine, _text(d)) == (want["d"], 0)


@pytest.mark.parametrize("family", ["onevision"])
def test_video_prompts_still_reuse_their_prefix(models, family):
    vlm = models(family)[0]
    video = np.random.default_rng(2).integers(0, 256, (3, 30, 40, 3), dtype=np.uint8)
    conv = [{"role": "user", "content": [{"type": "video", "video": video},
                                         {"type": "text", "text": "What happens?"}]}]
    enc = vlm.processor.encode(conv)
    engine = _engine(vlm)
    first, hit = _answer(engine, enc)
    again, hit = _answer(engine, enc)
    assert hit == (len(enc.input_ids) - 1) // BLOCK * BLOCK and again == first == _alone(vlm, enc)
