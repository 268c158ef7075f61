"""Llama / Mistral / Qwen2 decoder; the KV cache is the engine's, passed in as a PagedStep.

The three families differ only in switches read from `TextConfig`: qkv bias (Qwen2), per-layer
sliding windows (Mistral, Qwen2 when enabled), rope scaling (Llama-3). The model knows nothing of
batching policy: callers pass positions, the valid-key mask and the cache.

Dimension letters: B batch, T new tokens, S keys (cached + new), D width, H query heads,
Hkv key/value heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .layers import (RMSNorm, activation, apply_rope, block_attention, embedding, rope_cos_sin, rope_inv_freq,
                     uses_block_attention)


@dataclass
class PagedStep:
    """One engine step over a block-based key/value pool shared by many sequences.

    The pool holds, per layer, (slots, Hkv, hd) with slot = block * block_size + offset. Each row
    reads its keys by slot, in position order, so a key's index in `read_slots` is its position.
    """

    keys: list[torch.Tensor]  # per layer (slots, Hkv, hd)
    values: list[torch.Tensor]
    write_slots: torch.Tensor  # (B*T,) long: where the new tokens' keys/values go, row-major
    read_slots: torch.Tensor  # (B, S) long: every slot a row attends to (padding: any slot, masked)
    read_valid: torch.Tensor  # (B, S) bool: False at padding
    query_pos: torch.Tensor  # (B, T) long: positions of the new tokens
    # The caller's word that there is one row, every read slot is valid and the queries are the last T
    # positions: mask() then decides without reading device tensors (each read is a GPU sync).
    plain_causal: bool = False
    # The caller's word that some read slots may be padding (a fixed-size cache whose tail is unused):
    # mask() then builds the mask without reading device tensors, so the step can be captured as a
    # CUDA graph.
    padded: bool = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, Hkv, T, hd) into the pool; return each row's keys/values (B, Hkv, S, hd)."""
        b, h, t, d = k.shape
        pool_k, pool_v = self.keys[layer], self.values[layer]
        pool_k[self.write_slots] = k.transpose(1, 2).reshape(b * t, h, d)
        pool_v[self.write_slots] = v.transpose(1, 2).reshape(b * t, h, d)
        return pool_k[self.read_slots].transpose(1, 2), pool_v[self.read_slots].transpose(1, 2)  # (B, Hkv, S, hd)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """(B, 1, T, S) bool: causal by position, padding excluded, sliding window when given.

        None when plain causal attention from position 0 says the same (one row, no padding, no
        window): SDPA's causal kernel is much faster than a materialised mask.
        """
        b, t = self.query_pos.shape
        s = self.read_slots.shape[1]
        if window is None and (t == 1 or s == t) and b == 1 and not self.padded:
            if self.plain_causal or (bool(self.read_valid.all()) and int(self.query_pos[0, 0]) == s - t):
                return None
        key_pos = torch.arange(self.read_slots.shape[1], device=self.read_slots.device)[None, None, :]  # (1, 1, S)
        q = self.query_pos[:, :, None]  # (B, T, 1)
        allowed = (key_pos <= q) & self.read_valid[:, None, :]
        if window is not None:
            allowed = allowed & (key_pos > q - window)
        return allowed[:, None]


def attention_mask(valid: torch.Tensor | None, t: int, window: int | None, device,
                   segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T) mask for a forward without cache; None when plain causal suffices.

    valid: (B, T) bool, False at padding. A query always sees itself, so that padding rows stay
    finite instead of softmaxing an empty set.
    segments: (B, T) ints for rows that pack several sequences after one shared prefix (training
    with shared media): 0 marks the prefix, which every later token sees; a token of segment k > 0
    sees the prefix and the earlier tokens of segment k only, as if it were alone after the prefix.
    """
    if valid is None and window is None and segments is None:
        return None  # SDPA's is_causal fast path (and a single token sees itself)
    q_idx = torch.arange(t, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(t, device=device)[None, :]  # (1, T)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if segments is not None:
        seg = segments.to(device)
        allowed = allowed & ((seg[:, None, None, :] == 0) | (seg[:, None, None, :] == seg[:, None, :, None]))
    return allowed | (k_idx == q_idx)[None, None]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query token per row: (B, H, 1, hd) against (B, Hkv, S, hd); scores and softmax in float32.

    SDPA's CPU kernel is built for long queries; for a single one its setup costs more than the
    two small matmuls themselves (about 1 ms against 0.1 ms per layer at 1.5k keys). The keys are
    converted to float32 in their gathered (B, S, Hkv, hd) layout, a straight copy, and the
    probabilities meet the values in the cache's dtype: converting both in the transposed layout
    made strided copies (batch 8, 1.6k keys, bfloat16, alone: 7.4 -> 2.7 ms; a whole batch-8 decode
    step of the 0.5B preset: 3-4% faster). Float32 caches compute exactly as before.
    """
    b, h, _, hd = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, h // hkv, hd)  # (B, Hkv, G, hd): the query heads sharing each kv head
    keys = k.transpose(1, 2).float().permute(0, 2, 3, 1)  # (B, Hkv, hd, S)
    scores = qg @ keys * hd**-0.5  # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    out = scores.softmax(-1).to(v.dtype) @ v  # (B, Hkv, G, hd)
    return out.view(b, h, 1, hd).to(q.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, writing into the KV cache when given one."""

    def __init__(self, cfg: TextConfig, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)

    def _plain_causal(self, mask, cache: PagedStep | None) -> bool:
        """Whether the queries are the last T of one row's S positions, each seeing every earlier key:
        what `block_attention` computes. Besides mask None (S == T), a chunk of a prompt prefilled
        after its cached beginning (the engine marks it `plain_causal`) is such a case."""
        return mask is None or (cache is not None and cache.plain_causal and self.window is None)

    def forward(self, x, cos, sin, mask, layer_idx: int, cache: PagedStep | None) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, S, hd)
        if t == 1:
            out = _decode_attention(q, k, v, mask)
        elif self._plain_causal(mask, cache) and uses_block_attention(q, k.shape[2]):
            out = block_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.act is F.silu and not torch.is_grad_enabled():
            # In place: saves two (T, intermediate) temporaries per layer, 14 MB each in bfloat16 for a
            # 1.5k-token prefill of the 0.5B decoder (2.65 -> 2.13 s before load() kept freed memory,
            # 2.35 -> 2.30 s after; identical results).
            return self.down_proj(F.silu(gate, inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(self.act(gate) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, layer_idx: int, cache: PagedStep | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_idx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, decoder layers and final norm; `lm_head` lives on the top-level model."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.sliding_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        # A whole single-token step in one native call, when fused_decode.install() gave one: it
        # returns None for what it cannot take, and the layers below run instead.
        self.fused_decode = None
        self.weights_moved = 0  # counts _apply calls: the native step's structs point into the old storage

    def _apply(self, fn, recurse=True):
        self.weights_moved += 1
        return super()._apply(fn, recurse)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        cache: PagedStep | None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder on new tokens.

        embeds: (B, T, D) input embeddings. positions: (B, T) rope positions.
        valid: (B, T) bool, False at padding (None: no padding); only without a cache, a PagedStep
        carries its own.
        cache: the engine's PagedStep (keys and values written into its pool), or None for a plain forward.
        segments: without a cache, sequences packed after a shared prefix (see `attention_mask`);
        positions then restart after the prefix for each. Not with sliding windows, which count
        by index.
        Returns final-normed hidden states (B, T, D).
        """
        t = embeds.shape[1]
        if t == 1 and cache is not None and self.fused_decode is not None:
            hidden = self.fused_decode(embeds, positions, cache)
            if hidden is not None:
                return hidden
        cos, sin = rope_cos_sin(self.inv_freq, positions, embeds.dtype)
        windows = set(self.cfg.sliding_windows)
        if segments is not None and (cache is not None or windows != {None}):
            raise ValueError("packed segments need a forward without cache and a model without sliding windows.")
        if cache is not None:
            masks = {w: cache.mask(w) for w in windows}
        else:
            masks = {w: attention_mask(valid, t, w, embeds.device, segments) for w in windows}
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[self.cfg.sliding_windows[i]], i, cache)
        return self.norm(x)
