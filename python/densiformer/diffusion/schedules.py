"""Variance-preserving noise schedules, parameterised by the log signal-to-noise ratio.

Every schedule maps diffusion time t in [0, 1] (0 = data, 1 = noise) to
lambda(t) = log(alpha_t^2 / sigma_t^2), with alpha_t^2 + sigma_t^2 = 1 and
x_t = alpha_t * x_0 + sigma_t * eps. Denoisers are conditioned on lambda, not on t,
so one trained network works with every schedule and every step count: the paper's
discrete 120-step DDPM schedule is just another map from steps to lambda.
"""
from __future__ import annotations

import math

import torch


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of a VP process at the given log-SNR."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


class Schedule:
    """A monotone decreasing map t -> lambda(t) on [0, 1], with its inverse."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time(self, log_snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(self.log_snr(t))

    @property
    def log_snr_max(self) -> float:
        return float(self.log_snr(torch.tensor(0.0, dtype=torch.float64)))

    @property
    def log_snr_min(self) -> float:
        return float(self.log_snr(torch.tensor(1.0, dtype=torch.float64)))


class CosineSchedule(Schedule):
    """The cosine schedule, shifted so that lambda(0) = log_snr_max and lambda(1) = log_snr_min.

    lambda(t) = -2 log tan(a t + b). The default range [-10, 10] leaves sigma = 0.0067
    at t = 0 (well below the MAD-scaled data resolution) and alpha = 0.0067 at t = 1,
    so the end point is a standard normal to within the accuracy of the log densities.
    """

    def __init__(self, log_snr_min: float = -10.0, log_snr_max: float = 10.0):
        if not log_snr_min < log_snr_max:
            raise ValueError(f"need log_snr_min < log_snr_max, got {log_snr_min}, {log_snr_max}")
        self.b = math.atan(math.exp(-0.5 * log_snr_max))
        self.a = math.atan(math.exp(-0.5 * log_snr_min)) - self.b

    def log_snr(self, t):
        return -2.0 * torch.log(torch.tan(self.a * t + self.b))

    def time(self, log_snr):
        return (torch.atan(torch.exp(-0.5 * log_snr)) - self.b) / self.a

    def __repr__(self):
        return f"CosineSchedule({self.log_snr_min:.3g}, {self.log_snr_max:.3g})"


class DiscreteDDPMSchedule(Schedule):
    """The paper's discrete DDPM schedule: `num_steps` betas on a sigmoid ramp.

    Step i (1-based) sits at t = i / num_steps with alpha_bar_i = prod_{j<=i} (1 - beta_j);
    between steps lambda is interpolated linearly in t, and t = 0 extrapolates the first
    interval. Sampling with `steps=num_steps` reproduces the discrete ancestral sampler.
    """

    def __init__(self, num_steps: int = 120, beta_start: float = 1e-4, beta_end: float = 0.15):
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2, got {num_steps}")
        ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64))
        betas = beta_start + (beta_end - beta_start) * ramp
        alpha_bar = torch.cumprod(1.0 - betas, 0)
        lam = torch.log(alpha_bar) - torch.log1p(-alpha_bar)
        first = 2 * lam[0] - lam[1]  # linear extrapolation to t = 0
        self.num_steps = num_steps
        self.betas = betas
        self.knots_t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
        self.knots_lam = torch.cat([first.reshape(1), lam])

    def log_snr(self, t):
        t = torch.as_tensor(t)
        pos = t.to(torch.float64).clamp(0, 1) * self.num_steps
        i = pos.floor().clamp(max=self.num_steps - 1).long()
        w = pos - i
        knots = self.knots_lam.to(t.device)  # the knots live on the CPU; t may not
        lam = knots[i] * (1 - w) + knots[i + 1] * w
        return lam.to(t.dtype if t.is_floating_point() else torch.float64)

    def time(self, log_snr):
        log_snr = torch.as_tensor(log_snr)
        lam = log_snr.to(torch.float64)
        knots = self.knots_lam.to(lam.device)
        # knots_lam is decreasing; search on the negated, increasing sequence
        i = torch.searchsorted(-knots, -lam).clamp(1, self.num_steps) - 1
        lo, hi = knots[i], knots[i + 1]
        w = (lo - lam) / (lo - hi)
        t = (i + w) / self.num_steps
        return t.clamp(0, 1).to(log_snr.dtype if log_snr.is_floating_point() else torch.float64)

    def __repr__(self):
        return f"DiscreteDDPMSchedule({self.num_steps})"


class BandedSchedule(Schedule):
    """`base` re-timed so that a uniform time grid falls `density` times as densely inside
    the log-SNR band [lo, hi] as outside it.

    The map from noise to data and its log-SNR range are base's; only the time at which each
    log-SNR comes changes, so a fixed-step sampler (DDPM, DDIM, SMC) spends more of its steps
    in the band. Where the denoiser's posterior over x0 is bimodal (a rare mode decided at
    moderate noise), an ancestral step is a Gaussian around the posterior mean and lands
    between the modes; shorter steps there keep the rare mode (benchmarks/results/events/
    tails/README.md: on FitzHugh-Nagumo's exact denoiser, DDPM-100 keeps 44% of the spike mode
    on base's grid and 81% with the band [-8, -4] at density 8).

    With tau the base time and u this schedule's, u(tau) = (tau + (density - 1) * clip(tau -
    tau_hi, 0, tau_lo - tau_hi)) / norm, a piecewise-linear map inverted in closed form.
    """

    def __init__(self, base: Schedule, lo: float, hi: float, density: float = 8.0):
        if not lo < hi:
            raise ValueError(f"the band needs lo < hi, got [{lo}, {hi}]")
        if not density >= 1:
            raise ValueError(f"density must be at least 1, got {density}")
        self.base, self.lo, self.hi, self.density = base, float(lo), float(hi), float(density)
        # Base times of the band's ends (lambda decreases in t), clipped to [0, 1].
        self.tau_hi = float(base.time(torch.tensor(hi, dtype=torch.float64)).clamp(0, 1))
        self.tau_lo = float(base.time(torch.tensor(lo, dtype=torch.float64)).clamp(0, 1))
        self.width = self.tau_lo - self.tau_hi
        self.extra = density - 1.0
        self.norm = 1.0 + self.extra * self.width

    def _base_time(self, u):
        s = u * self.norm
        return s - self.extra * ((s - self.tau_hi) / self.density).clamp(0, self.width)

    def log_snr(self, t):
        return self.base.log_snr(self._base_time(torch.as_tensor(t)))

    def time(self, log_snr):
        tau = self.base.time(log_snr)
        return (tau + self.extra * (tau - self.tau_hi).clamp(0, self.width)) / self.norm

    def __repr__(self):
        return f"BandedSchedule({self.base!r}, [{self.lo:.3g}, {self.hi:.3g}], density {self.density:.3g})"


def get_schedule(name: str) -> Schedule:
    """Schedules by the names used in configs: "cosine" or "ddpm120"."""
    if name == "cosine":
        return CosineSchedule()
    if name == "ddpm120":
        return DiscreteDDPMSchedule(120)
    raise ValueError(f"unknown schedule {name!r}; choose 'cosine' or 'ddpm120'")
