"""Batch-1 decode on a GPU with the step captured as a CUDA graph, against the same step run eagerly.

    PYTHONPATH=. python bench/graph_decode.py --device cuda      # part of bench/gpu_check.py
    PYTHONPATH=. python bench/graph_decode.py --device cpu       # the eager half only: a test of the logic

On a GPU a small decoder's step is bound by kernel launches (hundreds per token), not by memory:
replaying a captured graph launches them all at once. The step here is the model's own decoder
(llavakit/model/text.py) over a fixed-size KV cache (one PagedStep whose read slots cover every
position, the unused tail masked), so that every tensor keeps its shape and address from step to
step, as capture requires. It prefills a --prompt-tokens prompt, then decodes --tokens greedy
tokens eagerly and again by graph replay, checks that both give the same tokens, and prints
tokens/s for both (medians of --runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from compare import _sync, cached_checkpoint  # noqa: E402  (bench/compare.py: GPU sync; the random checkpoint)


class StaticDecoder:
    """The decoder over a fixed-size cache: `step()` reads `token`/`pos`, writes the next token in place."""

    def __init__(self, vlm, slots: int):
        from llavakit.model.text import PagedStep

        model, cfg = vlm.model, vlm.model.cfg.text
        dev, dtype = model.device, model.dtype
        self.model, self.slots = model, slots
        self.keys = [torch.zeros(slots, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
                     for _ in range(cfg.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # the input token
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=dev)  # its position (= its slot)
        self.next = torch.zeros(1, dtype=torch.long, device=dev)
        self.slot_ids = torch.arange(slots, device=dev)
        self._paged = PagedStep

    def _step_for(self, pos: torch.Tensor):
        """A PagedStep for queries at positions `pos` (1, T): slot i holds position i."""
        return self._paged(keys=self.keys, values=self.values, write_slots=pos[0], read_slots=self.slot_ids[None],
                           read_valid=self.slot_ids[None] <= pos[0, -1], query_pos=pos, padded=True)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> int:
        dev = self.token.device
        ids_t = torch.tensor([ids], device=dev)
        pos = torch.arange(len(ids), device=dev)[None]
        embeds = self.model.language_model.embed_tokens(ids_t)
        logits = self.model.decode(embeds, pos, None, self._step_for(pos), last_only=True)
        first = int(logits[0, -1].float().argmax())
        self.token.fill_(first)
        self.pos.fill_(len(ids))
        return first

    def step(self) -> None:
        """One token: logits of `token` at `pos`, argmax into `next`; then token <- next, pos += 1."""
        embeds = self.model.language_model.embed_tokens(self.token)
        logits = self.model.decode(embeds, self.pos, None, self._step_for(self.pos), last_only=True)
        self.next.copy_(logits[0, -1].float().argmax(-1, keepdim=True))
        self.token.copy_(self.next[None])
        self.pos.add_(1)


def run(vlm, prompt: list[int], tokens: int, runs: int, device: str) -> dict:
    """Eager and (on CUDA) graph-replayed decoding of `tokens` tokens after `prompt`; tokens/s and agreement."""
    dec = StaticDecoder(vlm, len(prompt) + tokens + 1)

    def eager() -> list[int]:
        out = [dec.prefill(prompt)]
        _sync(device)
        with torch.inference_mode():
            for _ in range(tokens - 1):
                dec.step()
                out.append(dec.next.clone())  # stays on the device: no sync per token
        _sync(device)
        return [int(t) for t in out]

    def timed(fn) -> tuple[float, list[int]]:
        times, out = [], None
        fn()  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return (tokens - 1) / statistics.median(times), out

    result = {}
    result["eager_tok_s"], eager_tokens = timed(eager)
    if device != "cuda":
        result["eager_tokens"] = eager_tokens
        return result
    graph = torch.cuda.CUDAGraph()
    dec.prefill(prompt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # warm up on a side stream, as capture requires
            dec.step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.inference_mode(), torch.cuda.graph(graph):
        dec.step()

    def replayed() -> list[int]:
        out = [dec.prefill(prompt)]
        for _ in range(tokens - 1):
            graph.replay()
            out.append(dec.next.clone())
        torch.cuda.synchronize()
        return [int(t) for t in out]

    result["graph_tok_s"], graph_tokens = timed(replayed)
    result["same_tokens"] = graph_tokens == eager_tokens
    result["speedup"] = result["graph_tok_s"] / result["eager_tok_s"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="llava-onevision-qwen2-0.5b")
    p.add_argument("--layers", type=int)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cache", type=Path, default=BENCH / ".cache")
    p.add_argument("--out", type=Path, help="write the result here as JSON")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device.", file=sys.stderr)
        return 2
    import llavakit

    ckpt = cached_checkpoint(args.cache, args.preset, args.layers, "bfloat16")
    vlm = llavakit.load(ckpt, dtype=torch.bfloat16, device=args.device)
    prompt = list(range(300, 300 + args.prompt_tokens))
    result = run(vlm, prompt, args.tokens, args.runs, args.device)
    result.update(preset=args.preset, layers=args.layers, device=args.device, tokens=args.tokens)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
