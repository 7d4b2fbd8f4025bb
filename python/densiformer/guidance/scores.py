"""Conditional scores grad log p(x_t | E) for any denoiser, and guided sampling.

For x_t = alpha x0 + sigma eps, the score of x_t given an event E is the unconditional
score plus grad_{x_t} log p(E | x_t). With the noise prediction eps_hat (score
-eps_hat / sigma) the guided noise prediction is

    eps_E(x_t) = eps_hat(x_t) - sigma * grad_{x_t} log p(E | x_t),

which every sampler in diffusion.samplers and the probability-flow likelihood accept as
an ordinary denoiser. Each method approximates log p(E | x_t) from the Tweedie mean
x0_hat = (x_t - sigma eps_hat) / alpha; r_t^2 = sigma^2 / alpha^2 is the noise variance
in data units.

"moment" (Finzi et al. 2023): p(x0 | x_t) ~ N(x0_hat, Sigma), Sigma = (sigma^2 / alpha) J,
    J = d x0_hat / d x_t. For each elementary event on f = fn(x0), f is linearised at x0_hat,
    so f ~ N(f(x0_hat), s^2) with s^2 = (sigma^2 / alpha) g^T J g, g = grad f(x0_hat): one
    vector-Jacobian product per event. Intervals give log(Phi((hi - f)/s) - Phi((lo - f)/s))
    (log Phi(C / s) for a one-sided event); Equals(fn, v, tol) gives the Gaussian likelihood
    log N(v; f, s^2 + tol^2 / 3) (tol^2 / 3: the variance of the tolerance box). A
    conjunction sums the terms. Options: `std_grad` (default True, as in the paper)
    differentiates through s; False holds s fixed, so the gradient is
    sum_e dL_e/df * J^T g_e, from the products already computed: no second-order pass.
    `lookahead` (default 0: the paper's method) states f and its gradient at the denoiser's
    estimate one deterministic step closer to the data instead of at x0_hat: x_1 =
    alpha_1 x0_hat + sigma_1 eps_hat (a DDIM step to log-SNR lambda_t + lookahead), and
    x0_ahead = (x_1 - sigma_1 eps_hat(x_1)) / alpha_1; s stays the linearisation at x0_hat.
    One more denoiser call, differentiated through. Why: x0_hat is the posterior mean, a
    blurred window at high noise, and for a convex f (the Lorenz spectral energy) f(x0_hat)
    lies well below E[f(x0) | x_t] (Jensen). At log-SNR -3.6 the paper's p(E | x_t) reads
    0.48 where the model's own, from unguided continuations, is 0.08, so guidance idles
    while the trajectory can still be steered; x0_ahead is sharp and reads 0.10
    (benchmarks/bench_moment_calibration.py). Too long a step lands at low noise, where
    x1 is still the blurred x0_hat and the denoiser returns it (benchmarks/bench_lookahead.py
    measures the in-event rate against the step). On Lorenz-63, lookahead 4 with the
    gradient through s puts 0.98 of the samples in the event, the paper's method 0.77
    (benchmarks/results/events/lookahead).
"dps": reconstruction guidance (Ho et al. 2022; the Gaussian form of Chung et al.'s DPS):
    log p(E | x_t) ~ -(step_size / 2) sum_e viol_e(x0_hat)^2 / r_t^2, viol the distance of
    f(x0_hat) from the allowed interval; `step_size` (default 1) is the guidance weight.
"interval": Simformer-style (Gloeckler et al. 2024): sum over constraints C_i > 0 of
    log sigmoid(sharpness * C_i(x0_hat) / r_t), sharper as the noise falls; `sharpness`
    (default 1).
"""
from __future__ import annotations

import math

import torch

from ..diffusion import samplers
from ..diffusion.schedules import Schedule, alpha_sigma
from .events import Equals, Event, as_event

GUIDANCE = ("moment", "dps", "interval")
_OPTIONS = {"moment": {"std_grad": True, "lookahead": 0.0}, "dps": {"step_size": 1.0}, "interval": {"sharpness": 1.0}}
# Floor on the moment method's variance, relative to the isotropic r_t^2 |g|^2: a learned
# denoiser's J need not be positive definite. At log-SNR below about -9 (r_t^2 > 1e4) the
# floor exceeds a unit-scale prior's variance and softens the first step or two of the
# guidance; a floor relative to sigma_t^2 instead let a barely trained model's guided
# field blow up the likelihood ODE (tests/test_events.py).
_MIN_RELATIVE_VAR = 1e-4


def as_eps_fn(denoiser, prediction: str = "eps"):
    """eps_fn(x, log_snr) from a denoiser (torch module or callable) predicting eps, x0 or v."""
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a callable or torch module, got {type(denoiser).__name__}")
    if prediction == "eps":
        return denoiser
    if prediction not in ("x0", "v"):
        raise ValueError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'v'")

    def eps_fn(x, log_snr):
        alpha, sigma = alpha_sigma(log_snr)
        out = denoiser(x, log_snr)
        # x0: eps = (x - alpha x0) / sigma; v = alpha eps - sigma x0 gives eps = sigma x + alpha v
        return (x - alpha * out) / sigma if prediction == "x0" else sigma * x + alpha * out

    return eps_fn


def check_guidance(guidance: str, options: dict | None) -> dict:
    """The method's options with defaults filled in; clear errors for unknown names."""
    if guidance not in GUIDANCE:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of {list(GUIDANCE)}")
    options = dict(options or {})
    unknown = set(options) - set(_OPTIONS[guidance])
    if unknown:
        raise ValueError(f"guidance {guidance!r} takes options {sorted(_OPTIONS[guidance])}, got {sorted(unknown)}")
    lookahead = options.get("lookahead", 0.0)
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, float)) or not 0 <= lookahead < math.inf:
        raise ValueError(f"lookahead must be a finite log-SNR step >= 0, got {lookahead!r}")
    return {**_OPTIONS[guidance], **options}


def guided_eps_fn(eps_fn, event: Event, guidance: str = "moment", options: dict | None = None):
    """The guided noise prediction eps_E(x, log_snr) for `event` (stated on the denoiser's x).

    When x requires grad (as in the probability-flow likelihood, which differentiates the
    guided field for its divergence) the result keeps its graph; otherwise it is detached.
    """
    terms = guidance_terms(eps_fn, event, guidance, options)
    return lambda x, log_snr: terms(x, log_snr)[0]


def guidance_terms(eps_fn, event: Event, guidance: str = "moment", options: dict | None = None):
    """terms(x, log_snr) -> (eps_E, eps, log_lik): the guided and unguided noise predictions
    and the method's approximation of log p(E | x_t) per sample (what it differentiates).
    The twisted sampler (guidance.smc) weighs particles with log_lik."""
    event = as_event(event)
    options = check_guidance(guidance, options)
    atoms = event.atoms()

    def terms(x, log_snr):
        keep_graph = x.requires_grad and torch.is_grad_enabled()
        alpha, sigma = alpha_sigma(log_snr.to(torch.float64))
        alpha, sigma = float(alpha), float(sigma)
        with torch.enable_grad():
            xt = x if keep_graph else x.detach().requires_grad_(True)
            eps = eps_fn(xt, log_snr)
            x0 = (xt - sigma * eps) / alpha
            r2 = (sigma / alpha) ** 2
            if guidance == "moment":
                ahead = _look_ahead(eps_fn, x0, eps, log_snr, options["lookahead"]) if options["lookahead"] else None
                grad, loglik = _moment_grad(atoms, xt, x0, sigma**2 / alpha, r2, options["std_grad"], keep_graph,
                                            ahead)
            else:
                values = [a.value(x0) for a in atoms]
                if guidance == "dps":
                    loglik = -0.5 * options["step_size"] * sum(_violation(a, v) ** 2 for a, v in zip(atoms, values)) / r2
                else:
                    scale = options["sharpness"] / math.sqrt(r2)
                    loglik = sum(torch.nn.functional.logsigmoid(scale * a._constraints(v)).sum(-1)
                                 for a, v in zip(atoms, values))
                (grad,) = torch.autograd.grad(loglik.sum(), xt, create_graph=keep_graph)
        # Where the approximation breaks down numerically (e.g. a non-differentiable point of
        # the event function at x0_hat), that sample gets no guidance at this step.
        out = eps - sigma * torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        if keep_graph:
            return out, eps, loglik
        return out.detach(), eps.detach(), loglik.detach()

    return terms


def _look_ahead(eps_fn, x0, eps, log_snr, step):
    """The denoiser's estimate of x0 after a deterministic (DDIM) step from x_t to log-SNR
    log_snr + step: a sharp window where the Tweedie mean x0 is a blurred one.

    Near the data end log_snr + step can pass the top of the denoiser's training range
    (10 for the cosine schedule); it is not capped, since there sigma / alpha < e^-5 and
    the extrapolated eps_fn moves the estimate by less than that fraction of its error."""
    ahead = log_snr + step
    alpha, sigma = (float(v) for v in alpha_sigma(ahead.to(torch.float64)))
    x1 = alpha * x0 + sigma * eps
    return (x1 - sigma * eps_fn(x1, ahead)) / alpha


def _moment_grad(atoms, xt, x0, cov_scale, r2, std_grad, keep_graph, ahead=None):
    """(grad_{x_t} of L, L) for L = sum_e log p(E_e | x_t) under the moment-matched Gaussian;
    f is stated at `ahead` (the lookahead estimate) when given, else at x0_hat."""
    second_order = std_grad or keep_graph
    terms, values, vjps = [], [], []
    for atom in atoms:
        at_mean = atom.value(x0)
        (g,) = torch.autograd.grad(at_mean.sum(), x0, create_graph=True)
        value = at_mean if ahead is None else atom.value(ahead)
        (jtg,) = torch.autograd.grad(x0, xt, grad_outputs=g, create_graph=second_order, retain_graph=True)
        var = cov_scale * (jtg * g).sum(-1)
        var = torch.maximum(var, _MIN_RELATIVE_VAR * r2 * (g * g).sum(-1))
        if not std_grad:
            var = var.detach()
        terms.append(_log_likelihood(atom, value, var))
        values.append(value)
        vjps.append(jtg)
    loglik = sum(terms)
    if std_grad or ahead is not None:  # through s, or through the lookahead step: autograd
        (grad,) = torch.autograd.grad(loglik.sum(), xt, create_graph=keep_graph)
        return grad, loglik
    # s held fixed: d/dx_t L(f(x0_hat)) = dL/df * J^T g, with the products above.
    dl_df = torch.autograd.grad(loglik.sum(), values, create_graph=keep_graph)
    return sum(d[..., None] * jtg for d, jtg in zip(dl_df, vjps)), loglik


def _log_likelihood(atom, value, var):
    if isinstance(atom, Equals):
        total = var + atom.tol**2 / 3
        return -0.5 * (value - atom.target) ** 2 / total - 0.5 * torch.log(2 * math.pi * total)
    # float64: torch's float32 log_ndtr has a wrong gradient far in the lower tail (2.13:
    # 6.5e4 at u = -1e4 and 0.4 at -1e5, for about -u), which is where a sample outside
    # the event sits at low noise (tests/test_guidance.py).
    dtype, value, std = value.dtype, value.double(), var.double().sqrt()
    if math.isinf(atom.lo):
        out = torch.special.log_ndtr((atom.hi - value) / std)
    elif math.isinf(atom.hi):
        out = torch.special.log_ndtr((value - atom.lo) / std)
    else:
        out = log_ndtr_diff((atom.lo - value) / std, (atom.hi - value) / std)
    return out.to(dtype)


def log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stable in both tails."""
    # In the upper tail Phi(b) - Phi(a) = Phi(-a) - Phi(-b) keeps the CDFs small and exact.
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1((log_lo - log_hi).clamp(max=-1e-12)))


def _violation(atom, value):
    """Distance of f from the event's interval (0 inside)."""
    lo = value.new_tensor(atom.lo)
    hi = value.new_tensor(atom.hi)
    return torch.relu(lo - value) + torch.relu(value - hi)


def sample_with_event(denoiser, schedule: Schedule, event: Event, shape, *, guidance: str = "moment",
                      guidance_options: dict | None = None, prediction: str = "eps", sampler: str = "ddpm",
                      steps: int = 100, generator: torch.Generator | None = None, dtype=torch.float32,
                      device="cpu", **sampler_options) -> torch.Tensor:
    """Draw samples of shape `shape` (..., k) from a denoiser conditioned on `event`.

    denoiser(x, log_snr) predicts `prediction` ("eps", "x0" or "v") for x (..., k) at a
    0-d log-SNR; `event` is stated on x. guidance=None samples without guidance. Runs any
    sampler of diffusion.samplers (default: the stochastic DDPM sampler, whose noise
    corrects the approximations of the guidance; see benchmarks/bench_events.py).
    """
    eps_fn = as_eps_fn(denoiser, prediction)
    if guidance is not None:
        eps_fn = guided_eps_fn(eps_fn, event, guidance, guidance_options)
    noise = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        return samplers.sample(sampler, eps_fn, noise, schedule, steps, generator=generator, **sampler_options)
