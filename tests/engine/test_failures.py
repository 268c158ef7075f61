"""One request must not poison all: extreme sampling parameters are refused up front, and a row whose
logits cannot be sampled fails its own request only, while the others give their tokens alone."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit import native
import llavakit.engine.request as request_mod
from llavakit.engine.async_engine import AsyncEngine, EngineConfig
from llavakit.engine.core import Engine
from llavakit.engine.sampling import MIN_TEMPERATURE, REPETITION_PENALTY_RANGE, SamplingParams, sample_rows
from llavakit.errors import GenerationError, NonFiniteLogits

VICTIM_SEED = 424242  # marks the greedy request whose logits the tests turn to NaN


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(text, images=()):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def _unchecked(**fields) -> SamplingParams:
    """SamplingParams with values validation refuses (what a future bug or a bypass could let through)."""
    p = SamplingParams(max_new_tokens=12, temperature=1.0 if "temperature" in fields else 0.0)
    for name, value in fields.items():
        object.__setattr__(p, name, value)
    return p


def _poison_rows(monkeypatch, at_pick: int):
    """From the victim's `at_pick`-th pick on, its row of logits is NaN (on the plain greedy, batched path)."""
    real, seen = request_mod.sample_rows, [0]

    def poisoned(logits, params, history, generators):
        for row, p in enumerate(params):
            if p.seed == VICTIM_SEED:
                seen[0] += 1
                if seen[0] >= at_pick:
                    logits = logits.clone()
                    logits[row, 7] = float("nan")
        return real(logits, params, history, generators)

    monkeypatch.setattr(request_mod, "sample_rows", poisoned)


def _good(n=4):
    convs = [_conv(f"Tell me about picture {i}.", [_image(40 + i, 30 + 7 * i, 40)]) for i in range(n)]
    params = [SamplingParams(max_new_tokens=10) for _ in range(n)]
    params[-1] = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5)  # sampled rows too
    return list(zip(convs, params))


# ─────────────────────────── validation ───────────────────────────


@pytest.mark.parametrize("fields, needle", [
    (dict(temperature=1e-40), f"temperature must be >= 0: 0 (greedy) or at least {MIN_TEMPERATURE}"),
    (dict(temperature=0.009), "temperature"),
    (dict(temperature=math.inf), "temperature must be a number, not NaN or infinite"),
    (dict(repetition_penalty=1e-40), "repetition_penalty must be in [0.01, 100]"),
    (dict(repetition_penalty=101.0), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(top_p=math.nan), "top_p"),
])
def test_extreme_values_are_refused_naming_the_field(fields, needle):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**fields)
    assert needle in str(info.value)


def test_values_at_the_limits_are_accepted():
    low, high = REPETITION_PENALTY_RANGE
    SamplingParams(temperature=0)
    SamplingParams(temperature=MIN_TEMPERATURE, repetition_penalty=low)
    SamplingParams(temperature=2.0, repetition_penalty=high)


# ─────────────────────────── sample_rows ───────────────────────────


@pytest.mark.parametrize("kernel", ["native", "pytorch"])
def test_sample_rows_fails_only_the_unpickable_rows(kernel, monkeypatch):
    if kernel == "pytorch":  # greedy rows are picked by PyTorch's max where the native library is missing
        monkeypatch.setattr(native, "library", lambda: None)
    logits = torch.randn(7, 50)
    logits[1, 3] = float("nan")
    logits[2, 9] = float("inf")
    logits[3, :] = float("-inf")  # nothing to pick
    logits[4, 0] = float("-inf")  # one impossible token: fine
    logits[6, 0] = float("nan")
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0, seed=1, logprobs=True)
    params = [greedy, greedy, greedy, greedy, greedy, sampled, sampled]
    generators = [None] * 5 + [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    picks = sample_rows(logits, params, [[1, 2]] * 7, generators)
    assert [p.error is None for p in picks] == [True, False, False, False, True, True, False]
    assert picks[0].token_id == int(logits[0].argmax()) and picks[4].token_id == int(logits[4].argmax())
    assert all(isinstance(p.error, NonFiniteLogits) and p.token_id is None for p in picks if p.error is not None)
    # the same rows on the CPU path (log-probabilities asked for) give the same verdicts
    rows = sample_rows(logits, [SamplingParams(logprobs=True)] * 7, [[1, 2]] * 7, [None] * 7)
    assert [p.error is None for p in rows] == [True, False, False, False, True, True, False]
    assert [p.token_id for p in rows if p.error is None] == [int(logits[i].argmax()) for i in (0, 4, 5)]
    # tiny temperature and penalty (validation bypassed): the overflow is caught per row, not raised
    for p in (_unchecked(temperature=1e-40), _unchecked(repetition_penalty=1e-40)):
        row = torch.full((1, 50), 3.0)
        (pick,) = sample_rows(row, [p], [[1, 2, 3]], [None])
        assert isinstance(pick.error, NonFiniteLogits), p


def test_a_constraint_that_allows_nothing_fails_its_request_only():
    class Nothing:
        def mask(self, logits):
            return torch.full_like(logits, float("-inf"))

        def advance(self, token_id):
            raise AssertionError("no token was picked")

    logits = torch.randn(2, 50)
    picks = sample_rows(logits, [SamplingParams(constraint=Nothing()), SamplingParams()], [[1], [1]], [None, None])
    assert "the constraint allows no token" in str(picks[0].error) and picks[1].token_id == int(logits[1].argmax())


# ─────────────────────────── the engine ───────────────────────────


def test_one_bad_request_fails_alone_and_the_engine_keeps_serving(models, monkeypatch):
    vlm = models("llama")[0]
    good = _good()
    alone = [vlm.chat(c, sampling=p).token_ids for c, p in good]
    bad = {
        "nan_logits": SamplingParams(max_new_tokens=12, ignore_eos=True, seed=VICTIM_SEED),  # plain greedy
        "tiny_temperature": _unchecked(temperature=1e-40),
        "tiny_penalty": _unchecked(repetition_penalty=1e-40),
    }
    _poison_rows(monkeypatch, at_pick=3)  # the victim gives two tokens, then its logits turn NaN
    engine = Engine(vlm.model, vlm.processor.tokenizer, vlm.eos_ids, EngineConfig(max_batch_size=8))
    bad_convs = [_conv(f"Question {i} about this.", [_image(70 + i, 40, 30)]) for i in range(3)]
    order = [("g0", *good[0]), ("nan_logits", bad_convs[0], bad["nan_logits"]), ("g1", *good[1]),
             ("tiny_temperature", bad_convs[1], bad["tiny_temperature"]), ("g2", *good[2]),
             ("tiny_penalty", bad_convs[2], bad["tiny_penalty"]), ("g3", *good[3])]
    for rid, conv, params in order:
        engine.add_request(rid, vlm.processor.encode(conv), params)
    deltas = {rid: [] for rid, _, _ in order}
    steps = []  # per step, the requests that produced something
    while engine.has_unfinished():
        out = engine.step()
        steps.append({rid for rid, _ in out})
        for rid, d in out:
            deltas[rid].append(d)
    # They really ran together: every failure came in a step where good requests were decoding, and
    # good requests went on decoding after it.
    for rid in bad:
        failed = max(i for i, t in enumerate(steps) if rid in t)  # its last delta is the error
        assert any(g.startswith("g") for g in steps[failed]) and any(g.startswith("g") for g in steps[failed + 1])
    assert [[d.token_id for d in deltas[f"g{i}"]] for i in range(4)] == alone
    assert all(d.error is None for i in range(4) for d in deltas[f"g{i}"])
    for rid in bad:
        *before, last = deltas[rid]
        assert isinstance(last.error, NonFiniteLogits) and isinstance(last.error, GenerationError)
        assert (last.finish_reason, last.token_id, last.text) == ("error", None, "")
        assert all(d.error is None and d.finish_reason is None for d in before)
    assert len(deltas["nan_logits"]) == 3  # two tokens, then the error
    assert "the model's logits are NaN or +infinite" in str(deltas["nan_logits"][-1].error)
    stats = engine.stats()
    assert stats["requests_failed"] == 3 and stats["requests_finished"] == 7
    assert engine.pool.available() == engine.pool.num_blocks  # the failed requests' blocks came back
    # and it goes on serving, the victim's marker included
    conv, params = good[0]
    engine.add_request("after", vlm.processor.encode(conv), params)
    got = []
    while engine.has_unfinished():
        got += [d.token_id for _, d in engine.step()]
    assert got == alone[0]


def test_async_engine_fails_only_the_bad_stream(models, monkeypatch):
    vlm = models("llama")[0]
    good = _good(3)
    alone = [vlm.chat(c, sampling=p).token_ids for c, p in good]
    _poison_rows(monkeypatch, at_pick=2)

    async def main():
        engine = AsyncEngine(vlm, EngineConfig(max_batch_size=8))
        encoded = [await asyncio.to_thread(engine.encode, c) for c, _ in good]

        async def collect(rid, enc, params):
            return [d.token_id async for d in engine.submit(rid, enc, params)]

        victim = SamplingParams(max_new_tokens=12, ignore_eos=True, seed=VICTIM_SEED)
        results = await asyncio.gather(
            collect("v", encoded[0], victim),
            *(collect(f"g{i}", encoded[i], p) for i, (_, p) in enumerate(good)),
            collect("t", encoded[1], _unchecked(temperature=1e-40)),
            return_exceptions=True)
        assert isinstance(results[0], NonFiniteLogits) and isinstance(results[-1], NonFiniteLogits)
        assert results[1:-1] == alone
        again = await collect("again", encoded[2], good[2][1])  # the engine still serves
        assert again == alone[2]
        stats = engine.stats()
        assert stats["requests_failed"] == 2 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
        await engine.stop(timeout=5)

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def test_chat_generate_and_stream_raise_the_error(models):
    vlm = models("llama")[0]
    (conv, params), (conv2, _) = _good(2)
    bad = _unchecked(temperature=1e-40)
    with pytest.raises(NonFiniteLogits):
        vlm.chat(conv, sampling=bad)
    with pytest.raises(NonFiniteLogits, match="conversation 1"):
        vlm.generate([conv, conv2], [params, bad])
    with pytest.raises(NonFiniteLogits):
        list(vlm.chat(conv, sampling=bad, stream=True))
    assert not vlm.engine.has_unfinished()
    assert vlm.engine.pool.available() == vlm.engine.pool.num_blocks
    assert vlm.chat(conv, sampling=params).token_ids == vlm.generate([conv], params)[0].token_ids
