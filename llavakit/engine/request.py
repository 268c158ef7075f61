"""Per-request decoding state: sampled ids, streamed text, stop strings, finish reasons.

Shared by every way of generating (the continuous-batching engine and the one-batch path), so a
request streams and stops the same way wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import GenerationError
from ..processing.prompt import StreamDecoder, TextTokenizer
from .sampling import Pick, SamplingParams, sample_row, sample_rows


class StopMatcher:
    """Finds a request's stop strings in its growing text, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string, fed only the characters appended since the
    last call. An automaton's state is the length of the longest prefix of its stop string that
    ends the text so far: a complete match at `state == len(stop)`, and otherwise the number of
    trailing characters that may still become a stop (held back from streaming). Each character
    costs each automaton amortised O(1) transitions, whatever the stop's length.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.fail = [_failure(s) for s in stops]
        self.state = [0] * len(stops)
        self.steps = 0  # automaton transitions taken, all stops together (tests check it grows linearly)

    def feed(self, new: str, offset: int) -> int | None:
        """Consume `new`, the text appended at index `offset`; the start of the earliest stop found, or None.

        The whole piece is read, so among stops completed in it the one that starts first wins, as
        a search of the whole text would decide (a piece can complete "bcd" after "c" while "bcd"
        starts first).
        """
        earliest = None
        for k, stop in enumerate(self.stops):
            fail, state, steps = self.fail[k], self.state[k], 0
            for j, ch in enumerate(new):
                while state and stop[state] != ch:  # state < len(stop): a full match is reset below
                    state = fail[state - 1]
                    steps += 1
                steps += 1
                if stop[state] == ch:
                    state += 1
                    if state == len(stop):
                        start = offset + j + 1 - state
                        earliest = start if earliest is None else min(earliest, start)
                        state = fail[state - 1]  # this stop's first match in the piece is the one that counts
                        break
            self.state[k] = state
            self.steps += steps
        return earliest

    def hold(self) -> int:
        """Trailing characters that are a proper prefix of some stop string (the longest such)."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of s[: i + 1]."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


@dataclass
class Delta:
    """What one request produced in one step: a token and the text it completed (maybe empty)."""

    token_id: int | None  # None exactly when `error` is set
    text: str
    # "stop" (EOS or stop string) or "length" on the last step; "error" when `error` is set
    finish_reason: str | None = None
    logprob: float | None = None  # of token_id, when the request asked for log-probabilities
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # The request failed and is finished (e.g. NonFiniteLogits: its logits were NaN); only it.
    # Raise it to its caller; its text is "" and no token was produced.
    error: GenerationError | None = None


@dataclass
class RequestState:
    """The evolving output of one request."""

    params: SamplingParams
    decoder: StreamDecoder
    seen: list[int]  # prompt and generated ids, for the repetition penalty
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""  # all text so far, stop strings included
    emitted: int = 0  # characters of `text` already handed out
    done: bool = False
    stops: StopMatcher = field(init=False)

    def __post_init__(self):
        self.stops = StopMatcher(self.params.stop)

    @classmethod
    def start(cls, params: SamplingParams, tokenizer: TextTokenizer, prompt_ids: list[int]) -> "RequestState":
        """Fresh state; a seeded request gets its own generator, so other requests never shift its draws."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(params.seed)
        return cls(params=params, decoder=StreamDecoder(tokenizer), seen=list(prompt_ids), generator=generator)

    def sample(self, logits: torch.Tensor, eos_ids: set[int]) -> Delta:
        """Pick the next token from (V,) logits, record it, and say what it completed."""
        pick = sample_row(logits, self.params, self.seen, self.generator)
        return self.advance(pick, eos_ids)

    @staticmethod
    def sample_batch(states: list["RequestState"], logits: torch.Tensor, eos_ids: set[int]) -> list[Delta]:
        """`sample` for every row of (B, V) logits, row i for states[i], with at most two host syncs."""
        picks = sample_rows(logits, [s.params for s in states], [s.seen for s in states],
                            [s.generator for s in states])
        return [s.advance(pick, eos_ids) for s, pick in zip(states, picks)]

    def advance(self, pick: Pick, eos_ids: set[int]) -> Delta:
        """Record one sampled token and decide whether the request is finished.

        A pick with an error finishes the request at once, with reason "error", no token and no
        more text (text held back as a possible stop prefix is dropped).
        """
        if pick.error is not None:
            self.done = True
            return Delta(token_id=None, text="", finish_reason="error", error=pick.error)
        token = pick.token_id
        self.ids.append(token)
        self.seen.append(token)
        is_eos = token in eos_ids and not self.params.ignore_eos
        stop_at = None
        if not is_eos:
            new = self.decoder.push(token)
            stop_at = self.stops.feed(new, len(self.text))
            self.text += new
        hold = 0 if stop_at is not None else self.stops.hold()
        # A complete grammar allows only the end token next: stop now (ignore_eos too) instead of spending a step on it.
        grammar_done = self.params.constraint is not None and self.params.constraint.finished()
        reason = None
        if is_eos or stop_at is not None or grammar_done:
            reason = "stop"
        elif len(self.ids) >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            self.done = True
            if stop_at is None:
                self.text += self.decoder.flush()
            end = stop_at if stop_at is not None else len(self.text)
            self.text = self.text[:end]
        else:
            end = len(self.text) - hold
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return Delta(token_id=token, text=piece, finish_reason=reason, logprob=pick.logprob,
                     top_logprobs=pick.top_logprobs)
