"""The multimodal projector: a two-layer MLP from tower width to decoder width."""

from __future__ import annotations

import torch
from torch import nn

from ..config import LlavaConfig
from .layers import activation


class Projector(nn.Module):
    """linear_1 (Dv*k -> D) -> act -> linear_2 (D -> D); k = number of selected tower layers."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d_in = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        d = cfg.text.hidden_size
        self.linear_1 = nn.Linear(d_in, d, bias=cfg.projector_bias)
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
