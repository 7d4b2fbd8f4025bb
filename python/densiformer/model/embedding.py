"""Column embedding: every observed scalar becomes one token, GELU(W[col] * value + B[col])."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ColumnEmbedding(nn.Module):
    """Tokens for a row's columns. Tokens carry no position: the set is unordered,
    and the column's identity lives only in its own W[col] and B[col]."""

    def __init__(self, num_columns: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_columns, d_model))
        self.bias = nn.Parameter(torch.randn(num_columns, d_model) * 0.1)

    def forward(self, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """values, observed: (N, C) -> tokens (N, C, d_model).

        Missing values (NaN) are replaced by 0 only so the arithmetic stays finite;
        their tokens are masked out of attention and never seen.
        """
        values = torch.where(observed, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return F.gelu(values[..., None] * self.weight + self.bias)
