"""Sampling parameters and the logits → token step, per sequence.

The order of operations is transformers' own (repetition penalty, then temperature, top-k,
top-p), so seeded sampling draws from the same distribution; temperature 0 is greedy.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .. import native
from ..errors import GenerationError, NonFiniteLogits

# Below this, logits / temperature overflows float32 for ordinary logits (a 1e-40 temperature turns
# 10.0 into inf and softmax into NaN); 0 asks for greedy decoding, which needs no division at all.
MIN_TEMPERATURE = 1e-2
# The repetition penalty multiplies or divides a logit: within this range ordinary logits stay finite
# and the penalty is still meaningful (1 is off).
REPETITION_PENALTY_RANGE = (1e-2, 100.0)
# Stop strings are matched incrementally (engine/request.py, linear in the output), but each one
# holds an automaton per request: cap their number and length.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class TokenConstraint(Protocol):
    """Per-request constrained decoding (e.g. a JSON grammar): masks the logits, follows the tokens."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) float32 logits with disallowed tokens set to -inf."""

    def advance(self, token_id: int) -> None:
        """Record the token that was picked."""

    def finished(self) -> bool:
        """Whether nothing but the end token may follow: the request then ends with "stop" at once."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Limits (GenerationError names the field otherwise): temperature is 0 (greedy) or at least
    MIN_TEMPERATURE (0.01); repetition_penalty lies in REPETITION_PENALTY_RANGE ([0.01, 100]); top_p
    in (0, 1]; at most MAX_STOP_STRINGS (16) stop strings of 1 to MAX_STOP_CHARS (256) characters.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise at least MIN_TEMPERATURE
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output; 1 = off
    seed: int | None = None  # fixes the draws of this request, whatever else is in the batch
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these (earliest wins)
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks with forced lengths)
    logprobs: bool = False  # report the picked token's log-probability (of the model's distribution)
    top_logprobs: int = 0  # and the n most likely alternatives, 0..20
    # Stateful and per request: give every request its own instance.
    constraint: TokenConstraint | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        number = (int, float)
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                raise GenerationError(f"{name} must be a number, not NaN or infinite; got {value!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise GenerationError(f"seed must be an integer in [0, 2**63), got {self.seed!r}.")
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
             and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE,
             f"temperature must be >= 0: 0 (greedy) or at least {MIN_TEMPERATURE}"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)"),
            (low <= self.repetition_penalty <= high,
             f"repetition_penalty must be in [{low}, {high:g}] (1 turns it off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"stop takes at most {MAX_STOP_STRINGS} strings"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"each stop string must be at most {MAX_STOP_CHARS} characters long"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20, "top_logprobs must be in 0..20"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(f"{message}; got {self!r}.")

    @property
    def greedy(self) -> bool:
        """Temperature 0: always the most likely token."""
        return self.temperature == 0


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' logits divided by `penalty` if positive, else multiplied."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on a (V,) float32 row; removed tokens get -inf."""
    logits = logits / p.temperature
    if p.top_k > 0:
        k = min(p.top_k, logits.shape[-1])
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


@dataclass(frozen=True)
class Pick:
    """A sampled token, with log-probabilities when they were asked for; or why no token could be picked."""

    token_id: int | None  # None exactly when `error` is set
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: NonFiniteLogits | None = None  # this row's logits could not be sampled; the request must end


def _unpickable(why: str) -> Pick:
    """The Pick of a row that cannot be sampled: it ends its own request, no other."""
    return Pick(None, error=NonFiniteLogits(
        f"no next token can be picked for this request: {why}; the request was stopped. Retry with other "
        "sampling parameters; if it persists, the model itself overflows (a float16 model: load it as "
        "bfloat16 or float32)."))


def _pickable(logits: torch.Tensor) -> bool:
    """A (V,) row can be sampled iff its maximum is finite: no NaN (max propagates it), no +inf, and
    not every token at -inf. Single -inf entries are fine: they are tokens with probability 0."""
    return bool(torch.isfinite(logits.max()))


def _plain_greedy(p: SamplingParams) -> bool:
    """Argmax of the raw logits is the whole answer: no penalty, constraint or log-probabilities."""
    return p.greedy and p.repetition_penalty == 1.0 and p.constraint is None and not (p.logprobs or p.top_logprobs)


def _native_argmax(rows: torch.Tensor) -> tuple[list[int], list[bool]] | None:
    """(first-maximum ids, whether each maximum is finite) of CPU float32/bfloat16 rows by the native
    kernel, or None where it cannot run (another device or dtype, no library): then PyTorch picks."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16):
        return None
    lib = native.library()
    if lib is None:
        return None
    rows = rows.contiguous()
    b, v = rows.shape
    # ctypes arrays rather than tensors: two tensor allocations and two .tolist() cost more than the pick.
    index, best = (ctypes.c_int64 * b)(), (ctypes.c_float * b)()
    lib.lk_argmax(rows.data_ptr(), 1 if rows.dtype == torch.bfloat16 else 0, b, v, index, best)
    return list(index), [math.isfinite(x) for x in best]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
                generators: list[torch.Generator | None]) -> list[Pick]:
    """Pick one token per row of (B, V) logits, wherever the logits live.

    Plain greedy rows take one max on the logits' device and one transfer of B ids and B
    finiteness flags; every other row is copied to the CPU in one transfer and sampled there by
    `sample_row`. On a GPU each transfer is a host sync, so this costs at most two per step
    instead of one per request.
    The max picks the same token as `sample_row` (the first maximum; float32 conversion is exact).
    A row that cannot be sampled gets a Pick with `error` set (see `_pickable`); the other rows
    are unaffected.
    """
    picks: list[Pick | None] = [None] * len(params)
    plain = [i for i, p in enumerate(params) if _plain_greedy(p)]
    if plain:
        rows = logits if len(plain) == len(params) else logits[plain]  # (b, V)
        picked = _native_argmax(rows)
        if picked is not None:
            tokens, ok = picked
        else:
            if rows.device.type == "cpu" and rows.dtype != torch.float32:
                rows = rows.float()  # PyTorch's CPU argmax over 152k bfloat16 logits: 0.9 ms, over float32 0.3 ms
            # The row maxima say whether each row can be picked from (`_pickable`) at no extra pass over
            # the logits (torch.isfinite(rows).all(-1) would cost four argmaxes on a CPU); ids and flags
            # travel together: one host sync for the whole batch.
            best, tokens = rows.max(-1)  # (b,), (b,)
            tokens, ok = torch.stack((tokens, torch.isfinite(best).long())).tolist()  # (2, b)
        for i, token, finite in zip(plain, tokens, ok):
            picks[i] = Pick(token) if finite else _unpickable("the model's logits are NaN or +infinite")
    rest = [i for i, pick in enumerate(picks) if pick is None]
    if rest:
        host = logits[rest].float().cpu()  # (b, V)
        for row, i in zip(host, rest):
            picks[i] = sample_row(row, params[i], seen[i], generators[i])
    return picks


def sample_row(logits: torch.Tensor, p: SamplingParams, seen: list[int], generator: torch.Generator | None) -> Pick:
    """Pick the next token from one row of logits (V,).

    seen: the prompt and generated ids (read only for the repetition penalty).
    Log-probabilities are those of the model's own distribution, before penalties and warping.
    Runs on the CPU whatever the model's device: seeded generators are CPU generators, so a seed
    draws the same tokens on every device (given the same logits).
    Returns a Pick with `error` set, and leaves the constraint untouched, when the logits hold NaN
    or +inf, the penalty or the temperature overflows them, or the constraint allows no token.
    """
    raw = logits.float().cpu()  # per-request generators and histories live on the CPU
    if not _pickable(raw):
        return _unpickable("the model's logits are NaN or +infinite")
    logits = raw
    if p.repetition_penalty != 1.0:
        logits = penalize(logits, torch.tensor(seen, dtype=torch.long), p.repetition_penalty)
        if not _pickable(logits):
            return _unpickable("the repetition penalty made the logits infinite")
    if p.constraint is not None:
        logits = p.constraint.mask(logits)
        if not _pickable(logits):
            return _unpickable("the constraint allows no token")
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        logits = warp(logits, p)
        if not _pickable(logits):  # softmax of a row with a finite maximum is finite and sums to 1
            return _unpickable("dividing by the temperature made the logits infinite")
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
    if p.constraint is not None:
        p.constraint.advance(token)
    if not (p.logprobs or p.top_logprobs):
        return Pick(token)
    logp = raw.log_softmax(-1)
    top = ()
    if p.top_logprobs:
        values, ids = logp.topk(p.top_logprobs)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return Pick(token, float(logp[token]), top)
