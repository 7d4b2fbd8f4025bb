"""Event probabilities P(E) from a diffusion model, with standard errors.

For x drawn with guidance, both log densities come from the probability-flow ODE
(diffusion.likelihood): log p(x) of the unguided model and log q(x) of the guided one
(the ODE of the guided field). If q were p(x | E) = p(x) 1_E(x) / P(E), then
log p(x) - log q(x) = log P(E) at every x in E. Two estimators:

"direct" (Finzi et al. 2023): the mean of log p - log q over the guided samples that
    satisfy E, plus the log of the fraction that do (exact whenever q is proportional to
    p on E, whatever mass q puts outside E). It underestimates by KL(q_E || p_E) when
    the guided density is not exactly proportional to p on E.
"importance": P(E) = E_q[1_E(x) p(x) / q(x)], unbiased for samples drawn from q;
    heavier-tailed when q is poorly matched.

`monte_carlo_probability` is the plain fraction of unguided samples in E, for comparison
(useless for P(E) much below 1 / num_samples).

Every function reduces over the sample axis, the second-to-last of x (..., n, k), so a
batch of conditional models (one per row) gives one estimate per row.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..diffusion import likelihood, samplers
from ..diffusion.schedules import Schedule
from .events import Event, as_event
from .scores import as_eps_fn, guided_eps_fn

ESTIMATORS = ("direct", "importance")
# The guided field is stiff near the data end (its barrier sharpens as the noise falls),
# so the likelihood ODE runs with looser tolerances than the library's default; the
# error it leaves in log p - log q is below the Monte Carlo error at these settings
# (tests/test_guidance.py).
ODE_OPTIONS = {"method": "adaptive", "rtol": 1e-3, "atol": 1e-3}
# Above this many coordinates (dynamical-system windows: 180, 240) the divergence in both
# ODEs is Hutchinson's estimate from HUTCHINSON_PROBES fixed Rademacher probes per sample
# (diffusion.likelihood) instead of the exact trace's k VJPs per evaluation. Each log p -
# log q is then an unbiased per-sample estimate (same probes in both ODEs), and the
# sample-to-sample spread that the standard errors below are computed from includes the
# probe noise. Tabular targets (k <= 32) keep the exact trace. `ode_options` overrides both.
HUTCHINSON_ABOVE = 32
HUTCHINSON_PROBES = 4


def ode_options_for(k: int, ode_options: dict | None = None) -> dict:
    """The likelihood ODE options used for k coordinates: ODE_OPTIONS, the divergence, overrides."""
    auto = {"divergence": "hutchinson", "probes": HUTCHINSON_PROBES, "seed": 0} if k > HUTCHINSON_ABOVE else {}
    return {**ODE_OPTIONS, **auto, **(ode_options or {})}


class ProbabilityEstimate(NamedTuple):
    """P(E) and log P(E) with standard errors, shape x.shape[:-2] (one per conditional model)."""

    p: torch.Tensor
    p_se: torch.Tensor
    log_p: torch.Tensor
    log_p_se: torch.Tensor
    fraction_in_event: torch.Tensor  # of the samples used
    num_samples: int


def estimate_from_log_ratios(log_ratio: torch.Tensor, inside: torch.Tensor, estimator: str = "direct") -> ProbabilityEstimate:
    """P(E) from log p(x) - log q(x) and 1_E(x) of n guided samples (last axis)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    log_ratio, inside = log_ratio.double(), inside.bool()
    # Samples in E whose ratio is not finite (a failed ODE, see log_ratios) leave the sample.
    failed = inside & ~torch.isfinite(log_ratio)
    if bool(failed.any()):
        keep = ~failed
        if log_ratio.dim() != 1:
            raise FloatingPointError("non-finite log ratios in a batch of conditional models")
        log_ratio, inside = log_ratio[keep], inside[keep]
    n = log_ratio.shape[-1]
    count = inside.sum(-1).double()
    frac = count / n
    if estimator == "direct":
        mean = torch.where(inside, log_ratio, 0.0).sum(-1) / count.clamp(min=1)
        var = torch.where(inside, (log_ratio - mean[..., None]) ** 2, 0.0).sum(-1) / (count - 1).clamp(min=1)
        log_p = torch.log(frac) + mean
        # Delta method: the sample mean's variance plus the binomial variance of log(frac).
        log_p_se = torch.sqrt(var / count.clamp(min=1) + (1 - frac) / count.clamp(min=1))
        log_p = torch.where(count > 0, log_p, -math.inf)
        p = log_p.exp()
        return ProbabilityEstimate(p, p * log_p_se, log_p, log_p_se, frac, n)
    log_w = torch.where(inside, log_ratio, -math.inf)
    shift = log_w.max(-1).values.clamp(min=-1e300)  # rows with no sample in E give P = 0
    w = (log_w - shift[..., None]).exp()
    mean_w = w.mean(-1)
    se_w = w.std(-1) / math.sqrt(n)
    p = mean_w * shift.exp()
    p_se = se_w * shift.exp()
    return ProbabilityEstimate(p, p_se, p.log(), p_se / p, frac, n)


def log_ratios(eps_fn, guided_fn, x: torch.Tensor, schedule: Schedule, inside: torch.Tensor,
               ode_options: dict | None = None):
    """log p(x) - log q(x) (shape x.shape[:-1]) from the two probability-flow ODEs.

    Only samples in the event (`inside`) enter the estimates. The others are replaced by
    the first sample of their row that is in the event: outside it the guided field is a
    steep barrier, which would force the shared adaptive step size down for the batch.
    Their ratios are meaningless and must stay masked.
    """
    options = ode_options_for(x.shape[-1], ode_options)
    first = inside.to(torch.uint8).argmax(-1, keepdim=True)
    substitute = torch.gather(x, -2, first[..., None].expand(*first.shape, x.shape[-1]))
    x = torch.where(inside[..., None], x, substitute)
    if x.dim() == 2:
        return _robust_log_ratio(eps_fn, guided_fn, x, schedule, options)
    log_p = likelihood.log_prob(eps_fn, x, schedule, **options)
    log_q = likelihood.log_prob(guided_fn, x, schedule, **options)
    return log_p - log_q


def _robust_log_ratio(eps_fn, guided_fn, x, schedule, options):
    """log p - log q for samples x (n, k); a sample whose ODE is not finite gets NaN.

    The adaptive solver shares one step size across the batch and stops on a non-finite
    state; with a learned denoiser the guided field's second derivatives can overflow at
    a rare sample. The batch is then bisected so that only the failing samples are lost
    (estimate_from_log_ratios drops them).
    """
    try:
        # Hutchinson probes are drawn per call from the seed: same seed, same probes for p and q.
        log_p = likelihood.log_prob(eps_fn, x, schedule, **options)
        log_q = likelihood.log_prob(guided_fn, x, schedule, **options)
        return log_p - log_q
    except FloatingPointError:
        if len(x) == 1:
            return x.new_full((1,), math.nan)
        half = len(x) // 2
        return torch.cat([_robust_log_ratio(eps_fn, guided_fn, x[:half], schedule, options),
                          _robust_log_ratio(eps_fn, guided_fn, x[half:], schedule, options)])


def flow_log_ratios(eps_fn, guided_fn, noise: torch.Tensor, schedule: Schedule, event: Event,
                    ode_options: dict | None = None):
    """Samples of the guided probability-flow ODE from `noise`, with log p(x) - log q(x).

    Returns (x, log_ratio, inside). q is the density of these very samples (the guided
    ODE's push-forward of N(0, I), integrated alongside them), so the importance form is
    unbiased up to the solver's error, and the direct form's bias is exactly KL(q_E || p_E).
    """
    options = ode_options_for(noise.shape[-1], ode_options)
    with torch.no_grad():
        x, log_q = likelihood.sample_with_log_prob(guided_fn, noise, schedule, **options)
        inside = event.indicator(x)
        log_p = likelihood.log_prob(eps_fn, x, schedule, **options)
    return x, log_p - log_q, inside


def event_probability(denoiser, schedule: Schedule, event: Event, shape, *, guidance: str = "moment",
                      guidance_options: dict | None = None, prediction: str = "eps", estimator: str = "direct",
                      sampler: str = "flow", steps: int = 100, generator: torch.Generator | None = None,
                      ode_options: dict | None = None, dtype=torch.float32, device="cpu") -> ProbabilityEstimate:
    """P(E) under a denoiser from shape[-2] guided samples per model (shape (..., n, k)).

    sampler "flow" (default) draws the samples with the guided probability-flow ODE itself
    and takes log q from that solve (`flow_log_ratios`); any sampler of diffusion.samplers
    instead draws them with `steps` steps, and both densities are then evaluated by the ODE
    (log q is then the ODE's density, not exactly the sampler's). `ode_options` override
    ODE_OPTIONS.
    """
    event = as_event(event)
    if len(shape) < 2 or shape[-2] < 2:
        raise ValueError(f"shape must be (..., num_samples, k) with at least 2 samples, got {tuple(shape)}")
    eps_fn = as_eps_fn(denoiser, prediction)
    guided = guided_eps_fn(eps_fn, event, guidance, guidance_options)
    noise = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    if sampler == "flow":
        _, ratio, inside = flow_log_ratios(eps_fn, guided, noise, schedule, event, ode_options)
        return estimate_from_log_ratios(ratio, inside, estimator)
    with torch.no_grad():
        x = samplers.sample(sampler, guided, noise, schedule, steps, generator=generator)
        inside = event.indicator(x)
    return estimate_from_log_ratios(log_ratios(eps_fn, guided, x, schedule, inside, ode_options), inside, estimator)


def monte_carlo_probability(denoiser, schedule: Schedule, event: Event, shape, *, prediction: str = "eps",
                            sampler: str = "ddpm", steps: int = 100, generator: torch.Generator | None = None,
                            dtype=torch.float32, device="cpu") -> ProbabilityEstimate:
    """The fraction of shape[-2] unguided samples in E, with its binomial standard error."""
    event = as_event(event)
    noise = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        x = samplers.sample(sampler, as_eps_fn(denoiser, prediction), noise, schedule, steps, generator=generator)
        return binomial_estimate(event.indicator(x))


def binomial_estimate(inside: torch.Tensor) -> ProbabilityEstimate:
    n = inside.shape[-1]
    p = inside.double().mean(-1)
    p_se = torch.sqrt(p * (1 - p) / n)
    return ProbabilityEstimate(p, p_se, p.log(), p_se / p, p, n)


def weighted_estimate(inside: torch.Tensor, log_weight: torch.Tensor) -> ProbabilityEstimate:
    """P(E) from samples of a tilted model weighted back by exp(log_weight) (self-normalised
    over the last axis), with the delta-method standard error. Equal weights give
    binomial_estimate."""
    w = torch.softmax(log_weight.double(), -1)
    inside = inside.double()
    p = (w * inside).sum(-1)
    p_se = torch.sqrt((w * w * (inside - p[..., None]) ** 2).sum(-1))
    return ProbabilityEstimate(p, p_se, p.log(), p_se / p, inside.mean(-1), inside.shape[-1])
