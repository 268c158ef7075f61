"""The scheduler on its own: no model, no torch. A fake runner stands in for the model: it "computes"
whatever the scheduler picked and samples a fixed token, so admission, chunked prefill, prefix
sharing, waiting for blocks, finishing and aborting are checked step by step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llavakit.engine.blocks import BLOCK, BlockManager, BlockTable, blocks_for
from llavakit.engine.scheduler import ScheduledStep, Scheduler, Seq
from llavakit.errors import GenerationError


def _seq(name: str, prompt: list[int], max_new_tokens: int = 4) -> Seq:
    return Seq(name, list(prompt), max_new_tokens, BlockTable(list(prompt)), state=SimpleNamespace(ids=[]))


def _scheduler(blocks: int = 64, batch: int = 8, chunk: int = 2048, start: int | None = None) -> Scheduler:
    return Scheduler(BlockManager(blocks if start is None else start, blocks), batch, chunk)


def _step(s: Scheduler) -> tuple[ScheduledStep, list[str]]:
    """One engine step with a fake runner: a token (7) per decode row and per completed prompt; requests
    that reach max_new_tokens finish. Returns what was scheduled and who finished."""
    step = s.schedule()
    for seq in step.decode:
        seq.state.ids.append(7)
    for seq, n in step.prefill:
        if seq.table.length + n == len(seq.prompt):
            seq.state.ids.append(7)
    s.advance(step)
    finished = []
    for seq in step.decode + [seq for seq, _ in step.prefill]:
        if len(seq.state.ids) >= seq.max_new_tokens and seq in s.running:
            s.finish(seq)
            finished.append(seq.request_id)
    s.reap()
    return step, finished


def _names(step: ScheduledStep) -> tuple[list[str], list[tuple[str, int]]]:
    return [s.request_id for s in step.decode], [(s.request_id, n) for s, n in step.prefill]


def test_admission_stops_at_the_batch_size_and_resumes_when_one_finishes():
    s = _scheduler(batch=2)
    for name, new in [("a", 1), ("b", 5), ("c", 5)]:
        s.add(_seq(name, range(10 * ord(name), 10 * ord(name) + 5), new))
    step, finished = _step(s)
    assert _names(step) == ([], [("a", 5), ("b", 5)]) and [q.request_id for q in s.waiting] == ["c"]
    assert finished == ["a"]  # one new token was all it asked for
    step, _ = _step(s)
    assert _names(step) == (["b"], [("c", 5)])  # c took a's slot at the next step


def test_admission_reserves_the_whole_answer_and_waits_for_blocks():
    s = _scheduler(blocks=4)
    s.add(_seq("a", range(20), max_new_tokens=2 * BLOCK))  # 52 tokens: 4 blocks, the whole budget
    s.add(_seq("b", range(100, 105), max_new_tokens=2))  # 1 block
    step, _ = _step(s)
    assert _names(step) == ([], [("a", 20)]) and [q.request_id for q in s.waiting] == ["b"]
    assert len(s.running[0].table.blocks) == 4 and s.blocks.pool.available() == 0
    while s.running:
        step, finished = _step(s)
        assert "b" not in [q.request_id for q in step.decode]  # no preemption: b waits for a's blocks
    assert finished == ["a"] and s.blocks.pool.available() == 4
    step, _ = _step(s)
    assert _names(step) == ([], [("b", 5)])


def test_a_request_that_can_never_fit_is_refused_at_once():
    s = _scheduler(blocks=4)
    with pytest.raises(GenerationError, match="KV cache"):
        s.add(_seq("big", range(60), max_new_tokens=5))  # 65 tokens: 5 blocks
    s.add(_seq("ok", range(60), max_new_tokens=4))
    with pytest.raises(GenerationError, match="already in use"):
        s.add(_seq("ok", range(3)))
    assert [q.request_id for q in s.waiting] == ["ok"]


def test_requests_with_a_common_prefix_share_its_blocks():
    s = _scheduler()
    prompt = list(range(3 * BLOCK + 2))
    s.add(_seq("a", prompt, 8))
    _step(s)
    a = s.running[0]
    s.add(_seq("b", prompt[: 2 * BLOCK] + [5, 6, 7], 8))
    step, _ = _step(s)
    b = s.running[1]
    assert _names(step) == (["a"], [("b", 3)])  # b prefilled only its own tokens
    assert b.table.blocks[:2] == a.table.blocks[:2] and [s.blocks.pool.refs[x] for x in a.table.blocks[:3]] == [2, 2, 1]
    assert (s.prompt_tokens, s.prefix_hit_tokens) == (len(prompt) + 2 * BLOCK + 3, 2 * BLOCK)


def test_a_request_waits_for_a_prefix_another_is_still_prefilling():
    s = _scheduler(chunk=BLOCK)
    prompt = list(range(3 * BLOCK + 2))
    s.add(_seq("a", prompt, 2))
    _step(s)  # a has one block of its prompt in
    s.add(_seq("b", prompt + [9], 2))
    step, _ = _step(s)
    assert [q.request_id for q in s.waiting] == ["b"]  # batch room and blocks, but a is filling b's prefix
    assert _names(step) == ([], [("a", BLOCK)])
    while [q.request_id for q in s.waiting] == ["b"]:
        step, _ = _step(s)
    a, b = s.running
    assert b.table.blocks[:3] == a.table.blocks[:3] and s.prefix_hit_tokens == 3 * BLOCK  # every prompt block reused
    assert _names(step) == ([], [("a", 2), ("b", 3)])  # admitted once a had published them; b ran only its own


def test_chunked_prefill_spends_the_budget_oldest_first():
    s = _scheduler(chunk=40)
    for name in "abc":
        s.add(_seq(name, [ord(name)] * 30, 8))
    steps = [_names(_step(s)[0]) for _ in range(4)]
    assert steps == [
        ([], [("a", 30), ("b", 10)]),
        (["a"], [("b", 20), ("c", 20)]),
        (["a", "b"], [("c", 10)]),
        (["a", "b", "c"], []),
    ]


def test_aborting_frees_blocks_at_the_next_step():
    s = _scheduler(blocks=6)
    s.add(_seq("a", range(40), 8))  # 3 blocks
    s.add(_seq("b", range(100, 140), 8))  # 3 blocks
    s.add(_seq("c", range(200, 240), 8))  # waits for blocks
    _step(s)
    assert [q.request_id for q in s.running] == ["a", "b"] and s.blocks.pool.available() == 0
    assert s.abort("c") and not s.waiting  # a waiting request just leaves the queue
    assert s.abort("a") and not s.abort("a") and not s.abort("nobody")
    assert len(s.running) == 2 and s.blocks.pool.available() == 0  # the model may still read a's blocks
    step = s.schedule()
    assert _names(step) == (["b"], []) and s.blocks.pool.available() == 3
    assert "a" not in s.by_id and s.has_unfinished()


def test_a_finished_request_releases_its_blocks_and_leaves_its_prefix_cached():
    s = _scheduler(blocks=8)
    prompt = list(range(2 * BLOCK + 1))
    s.add(_seq("a", prompt, 3))
    while s.has_unfinished():
        _step(s)
    assert s.blocks.pool.available() == 8 and len(s.blocks.pool.evictable) == 2  # the two full prompt blocks
    s.add(_seq("again", prompt, 3))
    step, _ = _step(s)
    assert _names(step) == ([], [("again", 1)]) and s.prefix_hit_tokens == 2 * BLOCK
    assert blocks_for(len(prompt) + 3) == 3
