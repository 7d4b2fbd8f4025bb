"""The diffusion head: an MLP that predicts the noise on all declared targets jointly.

Its per-row conditioning (context projection plus request embedding) is computed once
per row by `condition`, and only added inside the step loop, never recomputed there.
The per-step cost is then: input layer, (head_layers - 1) residual layers, output layer.

The noise prediction is preconditioned: eps_hat = sigma * x_t + alpha * F, with the MLP
output F trained to match v = alpha * eps - sigma * x_0 (Salimans & Ho 2022). A bare
noise prediction must be accurate to far better than alpha near the noise end, since
x0_hat = (x_t - sigma eps_hat) / alpha divides its error by alpha (0.0067 at log-SNR
-10); the ODE samplers and likelihoods then carry that error to the data. Here the
error in eps_hat is alpha times the error in F, and x0_hat = alpha x_t - sigma F.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Log-SNR values seen in practice lie in about [-15, 15]; the time features are
# sinusoids of log_snr / LOG_SNR_RANGE with geometric frequencies.
LOG_SNR_RANGE = 15.0


class DiffusionHead(nn.Module):
    def __init__(self, d_model: int, num_targets: int, width: int, layers: int, time_features: int):
        super().__init__()
        self.context_proj = nn.Linear(d_model, width)
        self.request_proj = nn.Linear(num_targets, width, bias=False)
        self.register_buffer(
            "frequencies", math.pi * torch.logspace(0, math.log10(64), time_features // 2), persistent=False)
        self.time_proj = nn.Linear(time_features, width)
        self.input = nn.Linear(num_targets, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        self.output = nn.Linear(width, num_targets)

    def condition(self, context: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
        """(N, d_model), (N, K) 0/1 -> (N, width): the per-row term added at every step."""
        return self.context_proj(context) + self.request_proj(request.to(context.dtype))

    def time_embedding(self, log_snr: torch.Tensor) -> torch.Tensor:
        """(...) -> (..., width). One row per step when sampling, one per row in training."""
        angles = (log_snr.to(self.frequencies.dtype) / LOG_SNR_RANGE)[..., None] * self.frequencies
        return self.time_proj(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def predict_v(self, x: torch.Tensor, log_snr: torch.Tensor, cond: torch.Tensor,
                  request: torch.Tensor) -> torch.Tensor:
        """The MLP output F, an estimate of v = alpha eps - sigma x_0 (zero on unrequested targets).

        x: (..., K) noisy targets; log_snr broadcastable to x.shape[:-1]; cond: the
        output of `condition`, broadcastable to (..., width); request: 0/1 (..., K).
        """
        request = request.to(x.dtype)
        h = F.silu(self.input(x * request) + cond + self.time_embedding(log_snr))
        for layer in self.hidden:
            h = h + F.silu(layer(h))
        return self.output(h) * request

    def forward(self, x, log_snr, cond, request) -> torch.Tensor:
        """Predicted noise on the requested targets (zero elsewhere); arguments as in predict_v."""
        log_snr = torch.as_tensor(log_snr, dtype=x.dtype, device=x.device)
        alpha, sigma = torch.sigmoid(log_snr).sqrt()[..., None], torch.sigmoid(-log_snr).sqrt()[..., None]
        return sigma * x * request.to(x.dtype) + alpha * self.predict_v(x, log_snr, cond, request)
