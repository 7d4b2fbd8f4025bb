"""Twisted sequential Monte Carlo: exact event-conditioned sampling and P(E) from any guidance.

A guidance method approximates log p(E | x_t) by some l_t(x_t) and samples with the
guided transitions q(x_s | x_t). Where l_t is wrong, the samples are not p(x | E): with
the Lorenz-63 low-energy event the moment method's l_t says "likely" for nearly every
x_t at log-SNR below -4 (the Tweedie mean of a noisy window is a calm, blurred window),
so lobe switches decided there are never steered away, and the late, strong guidance
bends them into barely-calm windows. The twisted sampler of Wu et al. (2023, "Practical
and asymptotically exact conditional sampling in diffusion models") corrects that with
importance weights on a population of particles, using l_t as the twisting function:

    w_T = l_T(x_T),   w_s = l_s(x_s) p(x_s | x_t) / (l_t(x_t) q(x_s | x_t)),
    last step: w_0 = 1_E(x_0) / l_1(x_1), x_0 the unguided denoised x_1,

where p is the unguided DDPM transition, q the guided one (both Gaussian with the same
variance, so the ratio is closed form), with systematic resampling whenever the effective
sample size falls below `ess_fraction` of the particles. The output `x` is unweighted
(always resampled at the end): every sample lies in E, and as the particles grow the
samples tend to the model's p(x | E) whatever the quality of l_t, which only sets the
variance. The weighted particles before that last resampling (`particles`,
`log_weights`) describe the same distribution with less noise: estimate statistics of
p(x | E) from them (e.g. `weighted_ks`), and use `x` where equal-weight draws are needed.

The product of the mean incremental weights is an unbiased estimate of P(E) under the
model (its DDPM discretisation). Its standard error comes from `groups` independent
particle systems (the particles are split into groups that never exchange particles).
Costs: the guided sampler's own, plus the resampling (negligible); no second-order pass.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..diffusion.samplers import log_snr_grid
from ..diffusion.schedules import Schedule, alpha_sigma
from .events import Event, as_event
from .scores import as_eps_fn, guidance_terms

# Independent particle systems per batch entry by default: the spread of their P(E)
# estimates is the standard error.
GROUPS = 4


class TwistedSample(NamedTuple):
    """What `sample_twisted` returns; the probabilities have the batch shape (...)."""

    x: torch.Tensor  # (..., n, k) unweighted samples, each in E (if P > 0)
    p: torch.Tensor  # P(E) estimate: the mean over groups of each group's estimate
    p_se: torch.Tensor  # its standard error from the spread across groups (NaN for one group)
    min_ess: float  # smallest effective sample size seen, as a fraction of a group's particles
    resamplings: int
    distinct: torch.Tensor  # distinct initial particles among the final ones, per group (..., groups)
    particles: torch.Tensor  # (..., n, k) the final particles before the last resampling
    # (..., n) their log weights: logsumexp over a group's particles is log of its P(E)
    # estimate, so over all n (normalised) they weigh the groups by their estimates;
    # -inf outside E.
    log_weights: torch.Tensor
    ess: torch.Tensor  # (...,) effective sample size of those weights over all n particles


def sample_twisted(denoiser, schedule: Schedule, event: Event, shape, *, guidance: str = "moment",
                   guidance_options: dict | None = None, prediction: str = "eps", steps: int = 100,
                   groups: int = GROUPS, ess_fraction: float = 0.5, twist_from: float = -math.inf,
                   generator: torch.Generator | None = None, dtype=torch.float32, device="cpu",
                   log_weight=None) -> TwistedSample:
    """Draw shape (..., n, k) samples of p(x | E) by twisted SMC on the DDPM sampler.

    The n particles of each batch entry are split into `groups` independent systems of
    n / groups (n must divide), which gives P(E) its standard error.
    twist_from: below this log-SNR the twist is 1 and the particles take unguided steps
    (still exact). For an event that the twist underrates at high noise by orders of
    magnitude (FitzHugh-Nagumo's spikes at log-SNR -6.5), the few particles the model
    would carry into E otherwise get huge weights later, a tail that the population
    misses; starting the twist where it is calibrated avoids that.
    log_weight: None, or a function of the final x (..., k) -> (...), for a denoiser that
    models a tilted density (a tail-tilted window model: -log w): the samples are then of
    p(x | E) ∝ p_model(x) exp(log_weight(x)) on E, and `p` estimates
    E_model[1_E exp(log_weight)] (divide by E_model[exp(log_weight)] for the probability
    under the untilted density).
    """
    shape = tuple(shape)
    if len(shape) < 2 or groups < 1 or shape[-2] < 2 * groups or shape[-2] % groups:
        raise ValueError(f"shape must be (..., n, k) with n a multiple of groups={groups} and n >= 2 * groups, "
                         f"got {shape}")
    if not 0 < ess_fraction <= 1:
        raise ValueError(f"ess_fraction must be in (0, 1], got {ess_fraction}")
    if math.isnan(twist_from):
        raise ValueError("twist_from must be a log-SNR or -inf, got NaN")
    event = as_event(event)
    eps_fn = as_eps_fn(denoiser, prediction)
    guided_terms = guidance_terms(eps_fn, event, guidance, guidance_options)
    *batch, n, k = shape
    grouped = (*batch, groups, n // groups, k)

    def terms(x, log_snr):
        if float(log_snr) < twist_from:  # twist 1, unguided proposal: plain DDPM steps, weights unchanged
            with torch.no_grad():
                eps = eps_fn(x.reshape(shape), log_snr).reshape(grouped)
            return eps, eps, torch.zeros(grouped[:-1], dtype=x.dtype, device=x.device)
        # The denoiser sees the caller's (..., n, k) layout (it may broadcast a per-row condition).
        eps_g, eps_u, twist = guided_terms(x.reshape(shape), log_snr)
        return eps_g.reshape(grouped), eps_u.reshape(grouped), twist.reshape(grouped[:-1])

    def coefficients(lam):
        return (float(c) for c in alpha_sigma(torch.tensor(lam, dtype=torch.float64)))

    x = torch.randn(grouped, generator=generator, dtype=dtype, device=device)
    lams = log_snr_grid(schedule, steps, "time").tolist()
    origin = torch.arange(n // groups, device=device).expand(grouped[:-1]).clone()
    log_z = torch.zeros(grouped[:-2], dtype=torch.float64, device=device)
    min_ess, resamplings = 1.0, 0

    eps_g, eps_u, twist = terms(x, torch.tensor(lams[0], dtype=dtype, device=device))
    log_w = twist.double()  # the initial particles come from the prior itself
    for i in range(steps - 1):
        # The DDPM posterior step (diffusion.samplers.sample_ddpm), guided and unguided means.
        (alpha_t, sigma_t), (alpha_s, sigma_s) = coefficients(lams[i]), coefficients(lams[i + 1])
        r = math.exp(lams[i] - lams[i + 1])
        one_minus_r = -math.expm1(lams[i] - lams[i + 1])
        mean_g = alpha_s * (r / alpha_t * x + one_minus_r * (x - sigma_t * eps_g) / alpha_t)
        shift = alpha_s * one_minus_r * sigma_t / alpha_t * (eps_g - eps_u)  # mean_u - mean_g
        std = sigma_s * math.sqrt(one_minus_r)
        noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=device)
        x = mean_g + std * noise
        eps_g, eps_u, new_twist = terms(x, torch.tensor(lams[i + 1], dtype=dtype, device=device))
        # log p(x_s | x_t) - log q(x_s | x_t), with x_s - mean_g = std * noise.
        log_ratio = ((noise * noise).sum(-1) - ((std * noise - shift) ** 2).sum(-1) / std**2) / 2
        # A twist of -inf (an impossible particle) stays -inf instead of becoming NaN.
        log_w = torch.nan_to_num(log_w + (new_twist - twist + log_ratio).double(), nan=-math.inf)
        twist = new_twist
        ess = _ess_fraction(log_w)
        min_ess = min(min_ess, float(ess.min()))
        if bool((ess < ess_fraction).any()):
            log_z, log_w, (x, eps_g, eps_u, twist, origin) = _resample(log_z, log_w, (x, eps_g, eps_u, twist, origin),
                                                                       generator)
            resamplings += 1
    # The last step is the unguided chain's own denoising. The guided one would be no
    # proposal: at the data end the guided Tweedie mean moves every x_1 onto the boundary.
    alpha_t, sigma_t = coefficients(lams[steps - 1])
    x = (x - sigma_t * eps_u) / alpha_t
    final = -twist.double() if log_weight is None else log_weight(x).double() - twist.double()
    log_w = log_w + torch.where(event.indicator(x), final, -math.inf)
    particles = x.reshape(shape)
    log_weights = (log_z[..., None] + log_w - math.log(n // groups)).reshape(shape[:-1])
    log_z, log_w, (x, origin) = _resample(log_z, log_w, (x, origin), generator)
    p_groups = log_z.exp()
    p = p_groups.mean(-1)
    # One group (sampling only) has no spread to take a standard error from.
    p_se = p_groups.std(-1) / math.sqrt(groups) if groups > 1 else torch.full_like(p, math.nan)
    distinct = torch.tensor([len(torch.unique(o)) for o in origin.reshape(-1, origin.shape[-1])],
                            device=device).reshape(origin.shape[:-1])
    ess = _ess_fraction(log_weights) * n
    return TwistedSample(x.reshape(shape), p, p_se, min_ess, resamplings, distinct, particles, log_weights, ess)


def weighted_ks(values, log_weights, reference) -> float:
    """Two-sample KS statistic between weighted values (weights exp(log_weights), any
    scale; -inf drops a value) and an unweighted reference sample: the largest gap
    between the weighted and the reference empirical CDFs."""
    values, log_weights = np.asarray(values, dtype=np.float64), np.asarray(log_weights, dtype=np.float64)
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    if values.shape != log_weights.shape or values.ndim != 1 or reference.ndim != 1:
        raise ValueError("values and log_weights must be 1-D of the same length, reference 1-D")
    keep = np.isfinite(log_weights)
    if not keep.any() or len(reference) == 0:
        raise ValueError("weighted_ks needs at least one finite weight and a non-empty reference")
    values, w = values[keep], np.exp(log_weights[keep] - log_weights[keep].max())
    order = np.argsort(values, kind="stable")
    values, cdf = values[order], np.cumsum(w[order]) / w.sum()
    # Both CDFs at every point of either sample (right-continuous: ties counted in).
    points = np.concatenate([values, reference])
    f_weighted = np.concatenate([[0.0], cdf])[np.searchsorted(values, points, side="right")]
    f_reference = np.searchsorted(reference, points, side="right") / len(reference)
    return float(np.abs(f_weighted - f_reference).max())


def _ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n sum w^2) over the particle axis (-1); 0 when every weight is 0."""
    w = (log_w - log_w.max(-1, keepdim=True).values.clamp(min=-1e300)).exp()
    return torch.nan_to_num(w.sum(-1) ** 2 / (w.shape[-1] * (w * w).sum(-1)), nan=0.0)


def _resample(log_z, log_w, tensors, generator):
    """Systematic resampling of every particle system on its last axis; returns the
    updated log normalising constant, zeroed weights and the resampled tensors."""
    n = log_w.shape[-1]
    top = log_w.max(-1, keepdim=True).values
    finite = torch.isfinite(top)
    w = torch.where(finite, (log_w - torch.where(finite, top, 0)).exp(), 1.0)  # a dead system stays as it is
    log_z = log_z + torch.where(finite[..., 0], top[..., 0] + torch.log(w.mean(-1)), -math.inf)
    cdf = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    offset = torch.rand((*log_w.shape[:-1], 1), generator=generator, dtype=cdf.dtype, device=cdf.device)
    u = (offset + torch.arange(n, dtype=cdf.dtype, device=cdf.device)) / n
    index = torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp(max=n - 1)
    out = []
    for t in tensors:
        if t.dim() == index.dim():
            out.append(torch.gather(t, -1, index))
        else:
            out.append(torch.gather(t, -2, index[..., None].expand(*index.shape, t.shape[-1])))
    return log_z, torch.zeros_like(log_w), tuple(out)
