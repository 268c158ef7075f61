"""Stop strings: the incremental matcher streams and stops exactly as a search of the whole text would,
in time linear in the output; SamplingParams caps their number and length."""

from __future__ import annotations

import random

import pytest

from llavakit.engine.request import RequestState, StopMatcher
from llavakit.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, Pick, SamplingParams
from llavakit.errors import GenerationError


class _Pieces:
    """A stand-in StreamDecoder: token i decodes to pieces[i] (maybe ""), flush gives `tail`."""

    def __init__(self, pieces: list[str], tail: str = ""):
        self.pieces, self.tail = pieces, tail

    def push(self, token: int) -> str:
        return self.pieces[token]

    def flush(self) -> str:
        return self.tail


def _drive(pieces: list[str], stops, tail: str = "", eos_at: int | None = None):
    """Stream `pieces` through a RequestState: (streamed pieces, final text, finish reason, matcher)."""
    params = SamplingParams(max_new_tokens=len(pieces), stop=tuple(stops))
    state = RequestState(params=params, decoder=_Pieces(pieces, tail), seen=[], generator=None)
    out, reason = [], None
    for i in range(len(pieces)):
        delta = state.advance(Pick(i), {eos_at} if eos_at is not None else set())
        out.append(delta.text)
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            break
    return out, state.text, reason, state.stops


def _reference(pieces: list[str], stops, tail: str = "", eos_at: int | None = None):
    """The former quadratic implementation, kept as the definition of the behaviour."""
    text, emitted, out = "", 0, []
    for i, new in enumerate(pieces):
        is_eos = i == eos_at
        if not is_eos:
            text += new
        hits = [j for j in (text.find(s, max(0, emitted - len(s))) for s in stops) if j >= 0]
        stop_at, hold = (min(hits), 0) if hits else (None, 0)
        if not hits:
            for s in stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
        reason = "stop" if is_eos or stop_at is not None else "length" if i + 1 >= len(pieces) else None
        if reason is not None:
            if stop_at is None:
                text += tail
            end = stop_at if stop_at is not None else len(text)
            text = text[:end]
        else:
            end = len(text) - hold
        out.append(text[emitted : max(end, emitted)])
        emitted = max(end, emitted)
        if reason is not None:
            return out, text, reason
    return out, text, None


@pytest.mark.parametrize("pieces, stops, want_text, want_reason", [
    (["Hel", "lo ", "wor", "ld"], ["o w"], "Hell", "stop"),  # split across three tokens
    (["STOP", "and more"], ["STOP"], "", "stop"),  # at the very start
    (["aaab"], ["aab", "ab"], "a", "stop"),  # overlapping stops: the one starting first wins
    (["abcd"], ["bcd", "c"], "a", "stop"),  # one piece completes "c" first, but "bcd" starts first
    (["x", "abc", "d"], ["cd", "abcx"], "xab", "stop"),  # a long partial match that fails, then a short one
    (["日本", "語🙂", "ünï"], ["🙂ü"], "日本語", "stop"),  # code points, not bytes
    (["ab", "", "ab", "c"], ["abc"], "ab", "stop"),  # an empty piece (a token still held by the decoder)
    (["one ", "two"], ["three"], "one two", "length"),
])
def test_stop_cases(pieces, stops, want_text, want_reason):
    out, text, reason, _ = _drive(pieces, stops)
    assert (text, reason) == (want_text, want_reason)
    assert "".join(out) == text
    assert (out, text, reason) == _reference(pieces, stops)


def test_partial_stop_is_held_back_until_it_fails():
    out, text, reason, _ = _drive(["ab", "x", "ab", "!"], ["abc"])
    assert out == ["", "abx", "", "ab!"] and reason == "length"
    assert out == _reference(["ab", "x", "ab", "!"], ["abc"])[0]


def test_flush_and_eos_behave_as_before():
    # the decoder's flushed tail is appended at the end unchecked, as before; EOS adds no text
    for args in ((["ab", "c"], ["cd"], "d"), (["ab", "c", "zz"], ["cz"], "", 1)):
        assert _drive(*args)[:3] == _reference(*args)


def test_matches_a_search_of_the_whole_text_on_random_streams():
    rng = random.Random(0)
    alphabet = "ab🙂é"
    for case in range(3000):
        text = "".join(rng.choice(alphabet[: rng.randint(1, 4)]) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 15)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        stops = ["".join(rng.choice(alphabet[:3]) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        tail = rng.choice(["", "a", "🙂"])
        eos_at = rng.choice([None, None, rng.randrange(len(pieces))])
        got = _drive(pieces, stops, tail, eos_at)[:3]
        assert got == _reference(pieces, stops, tail, eos_at), (case, pieces, stops, tail, eos_at)


def _steps(tokens: int, stops: list[str], piece: str) -> int:
    _, _, reason, matcher = _drive([piece] * tokens, stops)
    assert reason == "length"
    return matcher.steps


@pytest.mark.parametrize("kind", ["repetitive", "random"])
def test_cost_is_linear_in_the_output(kind):
    """4,000 tokens against 8 stops of 256 characters; twice the output costs twice the automaton steps."""
    if kind == "repetitive":  # the former code's worst case: every step holds back 255 characters
        stops = ["a" * (MAX_STOP_CHARS - 1) + chr(ord("b") + i) for i in range(8)]
        piece = "aaa"
    else:  # random stops over a small alphabet; the output never completes one
        rng = random.Random(1)
        stops = ["".join(rng.choice("ab") for _ in range(MAX_STOP_CHARS)) for _ in range(8)]
        piece = "abaab"
    once, twice = _steps(4000, stops, piece), _steps(8000, stops, piece)
    chars = 4000 * len(piece)
    assert once <= 2 * chars * len(stops)  # amortised O(1) per character and stop, whatever the stop length
    assert twice <= 2.5 * once


def test_matcher_reports_hold_and_start():
    m = StopMatcher(("abab", "bx"))
    assert m.feed("aba", 0) is None and m.hold() == 3
    assert m.feed("b", 3) == 0  # "abab" starts at 0
    m = StopMatcher(())
    assert m.feed("anything", 0) is None and m.hold() == 0


def test_stop_caps():
    SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)  # at the limits: fine
    with pytest.raises(GenerationError, match=f"stop takes at most {MAX_STOP_STRINGS} strings"):
        SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(GenerationError, match=f"at most {MAX_STOP_CHARS} characters"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)])
