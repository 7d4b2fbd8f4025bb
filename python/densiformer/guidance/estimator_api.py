"""Event-conditioned sampling and event probabilities for a fitted DensityEstimator.

Events are stated in physical units; the model works in normalised units z, with
x = center + scale * z per requested column, so each event function is composed with
that map before it reaches the guidance.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import samplers
from .events import as_event
from .probability import ESTIMATORS, binomial_estimate, estimate_from_log_ratios, log_ratios
from .scores import check_guidance, guided_eps_fn
from .smc import GROUPS as SMC_GROUPS
from .smc import sample_twisted

# Guided sampling runs the generic (unfused) loop: the stochastic DDPM sampler on the
# paper's 120-step schedule, whose noise corrects the guidance's approximations.
GUIDED_SAMPLER, GUIDED_STEPS = "ddpm", 120


def normalized_event(est, event, request):
    center, scale = est.schema._params(request)
    center = torch.as_tensor(center, dtype=torch.float32, device=est.device)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=est.device)
    return as_event(event).compose(lambda z: center.to(z.dtype) + scale.to(z.dtype) * z)


def _schedule(est, sampler):
    from ..estimator import PAPER_DDPM_SCHEDULE

    return PAPER_DDPM_SCHEDULE if sampler == "ddpm" else est.schedule


def _batch_seed(seed: int, start: int) -> int:
    """A generator seed for the batch of rows that starts at `start`."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _twisted(est, cond, request_idx, num_samples, event_z, guidance, options, steps, seed, start, groups):
    """sample_twisted on the rows' conditional models (one particle system per row and group)."""
    eps_fn = est._denoiser(cond[:, None, :], request_idx)
    generator = torch.Generator(est.device).manual_seed(_batch_seed(seed, start))
    return sample_twisted(eps_fn, _schedule(est, "ddpm"), event_z, (len(cond), num_samples, len(request_idx)),
                          guidance=guidance, guidance_options=options, steps=steps, groups=groups,
                          generator=generator, device=est.device)


def _draw(est, cond, request_idx, num_samples, event_z, guidance, options, sampler, steps, seed, start):
    """Guided samples (rows, num_samples, k) in normalised units; noise seeded per batch."""
    eps_fn = est._denoiser(cond[:, None, :], request_idx)
    guided = guided_eps_fn(eps_fn, event_z, guidance, options) if guidance is not None else eps_fn
    generator = torch.Generator(est.device).manual_seed(_batch_seed(seed, start))
    noise = torch.randn(len(cond), num_samples, len(request_idx), generator=generator, device=est.device)
    with torch.no_grad():
        return eps_fn, guided, samplers.sample(sampler, guided, noise, _schedule(est, sampler), steps,
                                               generator=generator)


def sample_guided(est, values, request, num_samples, event, guidance, options, sampler, steps, seed,
                  progress, smc=False, rows_per_batch=256) -> np.ndarray:
    """Samples (n, num_samples, k) in normalised units, conditioned on `event`.

    smc=True runs the twisted SMC sampler (guidance.smc; DDPM only): each row's samples
    are one particle system, all in the event, tending to p(x | inputs, E) exactly."""
    options = check_guidance(guidance, options)
    if smc and sampler not in (None, "ddpm"):
        raise ValueError(f"smc=True runs on the DDPM sampler, got sampler={sampler!r}")
    if smc and num_samples < 2:
        raise ValueError("smc=True needs num_samples >= 2 (the particles of each row)")
    sampler, steps = sampler or GUIDED_SAMPLER, steps or GUIDED_STEPS
    samplers.nfe(sampler, steps)
    request_idx = [est.targets.index(r) for r in request]
    event_z = normalized_event(est, event, request)
    out = np.empty((len(values), num_samples, len(request)), dtype=np.float32)
    rows = max(1, rows_per_batch * 64 // num_samples)
    with tqdm(total=len(values), disable=not progress, desc="guided sampling", unit="row") as bar:
        for start in range(0, len(values), rows):
            cond = est._condition(values[start:start + rows], request_idx)
            if smc:
                z = _twisted(est, cond, request_idx, num_samples, event_z, guidance, options, steps, seed, start, 1).x
            else:
                z = _draw(est, cond, request_idx, num_samples, event_z, guidance, options, sampler, steps, seed,
                          start)[2]
            out[start:start + len(cond)] = z.cpu().numpy()
            bar.update(len(cond))
    return out


def event_probability(est, values, request, event, num_samples, guidance, options, estimator, sampler, steps,
                      seed, ode_options, progress, rows_per_batch=16):
    """Per-row ProbabilityEstimate fields as float64 arrays: (p, p_se, log_p, log_p_se).

    estimator "direct" or "importance" (guided samples, two probability-flow ODEs),
    "smc" (the twisted SMC sampler's estimate, SMC_GROUPS independent particle systems of
    num_samples / SMC_GROUPS), or "monte_carlo" (the fraction of unguided samples in the event).
    """
    choices = ESTIMATORS + ("smc", "monte_carlo")
    if estimator not in choices:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(choices)}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    if estimator == "smc" and (num_samples % SMC_GROUPS or num_samples < 2 * SMC_GROUPS):
        raise ValueError(f"estimator 'smc' needs num_samples a multiple of {SMC_GROUPS} and at least "
                         f"{2 * SMC_GROUPS}, got {num_samples}")
    options = check_guidance(guidance, options)
    sampler, steps = sampler or GUIDED_SAMPLER, steps or GUIDED_STEPS
    samplers.nfe(sampler, steps)
    request_idx = [est.targets.index(r) for r in request]
    event_z = normalized_event(est, event, request)
    out = np.empty((4, len(values)))
    with tqdm(total=len(values), disable=not progress, desc="event probability", unit="row") as bar:
        for start in range(0, len(values), rows_per_batch):
            cond = est._condition(values[start:start + rows_per_batch], request_idx)
            if estimator == "monte_carlo":
                _, _, z = _draw(est, cond, request_idx, num_samples, event_z, None, None, sampler, steps, seed, start)
                fields = binomial_estimate(event_z.indicator(z))[:4]
            elif estimator == "smc":
                r = _twisted(est, cond, request_idx, num_samples, event_z, guidance, options, steps, seed, start,
                             SMC_GROUPS)
                fields = r.p, r.p_se, r.p.log(), r.p_se / r.p
            else:
                eps_fn, guided, z = _draw(est, cond, request_idx, num_samples, event_z, guidance, options,
                                          sampler, steps, seed, start)
                with torch.no_grad():
                    inside = event_z.indicator(z)
                ratio = log_ratios(eps_fn, guided, z, est.schedule, inside, ode_options)
                # ProbabilityEstimate's first fields: p, p_se, log_p, log_p_se
                fields = estimate_from_log_ratios(ratio, inside, estimator)[:4]
            for i, field in enumerate(fields):
                out[i, start:start + len(cond)] = field.detach().cpu().numpy()
            bar.update(len(cond))
    return out
