"""The ViT vision tower (CLIP or SigLIP), returning the hidden states LLaVA selects.

CLIP: bias-free patch conv, a class token, a pre-layernorm, quick_gelu. SigLIP: patch conv with
bias, no class token, no pre-layernorm, tanh-approximated gelu. Everything else is shared.

Dimension letters: N images (tiles), P patches per side, L tokens per image (P*P, +1 with a
class token), Dv tower width, Hv heads, hd head dim.

    pixels (N, 3, S, S) ─► conv patchify ─► [CLS] + patches + positions ─► pre-LN ─► layers ─► select
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import activation, dense_attention, embedding, uses_dense_attention


class VisionEmbeddings(nn.Module):
    """Patchify with a strided conv, prepend the class token (CLIP), add learned positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not cfg.has_class_token)
        n_pos = cfg.patches_per_side**2 + (1 if cfg.has_class_token else 0)
        if cfg.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = embedding(n_pos, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (N, Dv, P, P)
        x = x.flatten(2).transpose(1, 2)  # (N, P*P, Dv)
        if self.cfg.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(n, 1, -1)  # (N, 1, Dv)
            x = torch.cat([cls, x], dim=1)  # (N, L, Dv)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    """Multi-head self-attention over all patches (no mask)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        # Heads counted from q_proj's output, as the decoder does: a tensor-parallel rank holds some of them.
        shape = (n, length, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (N, Hv, L, hd)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if uses_dense_attention(q):
            out = dense_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))  # (N, L, Dv)


class VisionMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The stack of layers; a module of its own so parameter names match the checkpoints'."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """CLIP or SigLIP vision transformer. `post_layernorm` is loaded (it is in every checkpoint) but
    LLaVA never uses it: the selected hidden states come before it."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
        """Hidden states at `layers` (indices into the num_layers+1 states), concatenated on the last dim.

        pixels: (N, 3, S, S) with S = image_size. Returns (N, L, Dv * len(layers)). Layers after the
        deepest one requested are skipped: with the usual `-2`, the last layer is never computed.
        """
        s = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(
                f"vision tower expects pixel values of shape (N, {self.cfg.num_channels}, {s}, {s}), "
                f"got {tuple(pixels.shape)}"
            )
        n_states = self.cfg.num_layers + 1
        wanted = [i % n_states for i in layers]
        x = self.embeddings(pixels)
        if self.cfg.has_class_token:
            x = self.pre_layrnorm(x)  # hidden state 0 is taken after it
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            x = layer(x)
            if i in wanted:
                states[i] = x
        return torch.cat([states[i] for i in wanted], dim=-1)
