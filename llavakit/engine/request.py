"""Per-request decoding state: sampled ids, streamed text, stop strings, finish reasons.

Shared by every way of generating (the continuous-batching engine and the one-batch path), so a
request streams and stops the same way wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..processing.prompt import StreamDecoder, TextTokenizer
from .sampling import Pick, SamplingParams, sample_row, sample_rows


@dataclass
class Delta:
    """What one request produced in one step: a token and the text it completed (maybe empty)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length" on the last step
    logprob: float | None = None  # of token_id, when the request asked for log-probabilities
    top_logprobs: tuple[tuple[int, float], ...] = ()


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
        """Record one sampled token and decide whether the request is finished."""
        token = pick.token_id
        self.ids.append(token)
        self.seen.append(token)
        is_eos = token in eos_ids and not self.params.ignore_eos
        if not is_eos:
            self.text += self.decoder.push(token)
        stop_at, hold = self._stop_cut()
        reason = None
        if is_eos or stop_at is not None:
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

    def _stop_cut(self) -> tuple[int | None, int]:
        """(index where a stop string starts or None, characters to hold back as a possible stop prefix)."""
        stops = self.params.stop
        if not stops:
            return None, 0
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in stops) if i >= 0]
        if hits:
            return min(hits), 0
        hold = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return None, hold
