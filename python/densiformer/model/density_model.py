"""The whole network: column embedding -> encoder -> context -> diffusion head."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .embedding import ColumnEmbedding
from .encoder import Encoder
from .head import DiffusionHead


class DensityModel(nn.Module):
    """Noise prediction for the targets given a row's observed columns.

    Columns are all the model's columns (targets included: a target that is not
    requested may be observed and conditioned on). `target_columns[j]` is the column
    index of target j. Values are in normalised units, NaN = missing.
    """

    def __init__(self, num_columns: int, target_columns: list[int], config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("target_columns", torch.tensor(target_columns, dtype=torch.long), persistent=False)
        self.embedding = ColumnEmbedding(num_columns, config.d_model)
        self.encoder = Encoder(config.d_model, config.encoder_layers, config.heads, config.ff_mult, config.dropout)
        self.head = DiffusionHead(config.d_model, len(target_columns), config.head_width,
                                  config.head_layers, config.time_features)

    def observed_inputs(self, values: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
        """Observed mask (N, C) with every requested target removed from the inputs."""
        observed = ~torch.isnan(values)
        requested_columns = torch.zeros_like(observed)
        requested_columns[:, self.target_columns] = request.bool()
        return observed & ~requested_columns

    def context(self, values: torch.Tensor, observed: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """(N, C) values and observed mask -> (N, d_model) context."""
        return self.encoder(self.embedding(values, observed), ~observed, backend)

    def condition(self, values: torch.Tensor, request: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Per-row head conditioning (N, width), computed once per row.

        request: (N, K) 0/1. Requested targets are dropped from the inputs here, so no
        caller can leak a target into its own condition.
        """
        observed = self.observed_inputs(values, request)
        return self.head.condition(self.context(values, observed, backend), request)

    def forward(self, x, log_snr, cond, request):
        return self.head(x, log_snr, cond, request)
