"""The exact denoiser of a finite sample: a reference for samplers, free of network error.

For the empirical distribution of points x_1..x_n, the noisy x_t = alpha x0 + sigma eps
has the posterior weights w_i(x_t) = softmax_i(-|x_t - alpha x_i|^2 / (2 sigma^2)), so

    x0_hat(x_t) = sum_i w_i x_i,   eps_hat = (x_t - alpha x0_hat) / sigma

exactly. An exact sampler driven by it reproduces the points' distribution, so the gap
between a statistic of its samples and that of the points is the sampler's own error
(discretisation, the Gaussian step of ancestral samplers), apart from any network. At
high noise the weights spread over many points (a kernel estimate with bandwidth
sigma / alpha); at low noise they collapse on the nearest point, so its samples are
copies of the points: a diagnostic, not a generative model.
"""
from __future__ import annotations

import torch
from torch import nn

from .schedules import alpha_sigma


class EmpiricalDenoiser(nn.Module):
    """eps_hat(x, log_snr) of the empirical distribution of `points` (n, dim).

    The weights are computed in float64 (the logits grow as 1 / sigma^2) over chunks of
    `chunk` rows of x, so memory stays at chunk * n.
    """

    def __init__(self, points: torch.Tensor, chunk: int = 1024):
        super().__init__()
        if points.ndim != 2 or len(points) < 1:
            raise ValueError(f"points must be (n, dim) with n >= 1, got shape {tuple(points.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.register_buffer("points", points.detach().to(torch.float64))
        self.register_buffer("squared_norms", self.points.square().sum(-1))
        self.chunk = chunk

    def x0_hat(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(log_snr.to(torch.float64).expand(x.shape[:-1]).reshape(-1))
        rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
        out = []
        for start in range(0, len(rows), self.chunk):
            xc, a, s = (v[start:start + self.chunk] for v in (rows, alpha, sigma))
            # -|x - a p|^2 / 2s^2 up to a term constant in i, which the softmax drops.
            logits = (2 * a[:, None] * xc @ self.points.T - a[:, None] ** 2 * self.squared_norms) / (2 * s[:, None] ** 2)
            out.append(torch.softmax(logits, -1) @ self.points)
        return torch.cat(out).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = alpha_sigma(log_snr.to(x.dtype))
        alpha, sigma = alpha[..., None], sigma[..., None]
        return (x - alpha * self.x0_hat(x, log_snr)) / sigma
