"""Pre-LayerNorm Transformer encoder over a set of column tokens plus a summary token."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import masked_attention


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(),
                                nn.Linear(ff_mult * d_model, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        N, L, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = masked_attention(q, k, v, padding, backend=backend)
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(N, L, d)))
        return x + self.dropout(self.ff(self.norm2(x)))


class Encoder(nn.Module):
    """Maps a row's tokens to one context vector: the output at a learned summary token.

    The summary token is always present and never masked, so a row with nothing
    observed still gets a context (the unconditional density), and no attention row
    is ever fully masked.
    """

    def __init__(self, d_model: int, layers: int, heads: int, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.summary = nn.Parameter(torch.randn(d_model) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, heads, ff_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """tokens (N, L, d), padding (N, L) bool (True = missing) -> context (N, d)."""
        N = tokens.shape[0]
        x = torch.cat([self.summary.expand(N, 1, -1).to(tokens.dtype), tokens], dim=1)
        padding = torch.cat([padding.new_zeros(N, 1), padding], dim=1)
        for block in self.blocks:
            x = block(x, padding, backend)
        return self.norm(x[:, 0])
