"""Analytic diffusion targets with exact denoisers, shared by the sampler and likelihood tests."""
import math

import torch

from densiformer.diffusion.schedules import CosineSchedule, DiscreteDDPMSchedule, alpha_sigma

SCHEDULES = [CosineSchedule(), DiscreteDDPMSchedule(120)]
SCHEDULE_IDS = ["cosine", "ddpm120"]


class GaussianTarget:
    """x0 = R y, y ~ N(mean, diag(std^2)): exact eps, probability-flow map and model density."""

    def __init__(self, mean, std, rotation=None):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.rotation = torch.eye(len(self.mean), dtype=torch.float64) if rotation is None else rotation

    def _marginal(self, log_snr, dtype):
        alpha, sigma = alpha_sigma(torch.as_tensor(log_snr, dtype=dtype))
        return alpha, sigma, alpha**2 * self.std.to(dtype) ** 2 + sigma**2

    def eps(self, x, log_snr):
        # log_snr broadcasts against x.shape[:-1]; the marginal of y is N(alpha m, alpha^2 s^2 + sigma^2)
        alpha, sigma, var = self._marginal(log_snr[..., None], x.dtype)
        rotation = self.rotation.to(x.dtype)
        y = x @ rotation
        return (sigma * (y - alpha * self.mean.to(x.dtype)) / var) @ rotation.T

    def flow(self, x, lam_from, lam_to):
        """The exact probability-flow map: (y - alpha m) / sqrt(var) is constant along it."""
        alpha0, _, var0 = self._marginal(lam_from, torch.float64)
        alpha1, _, var1 = self._marginal(lam_to, torch.float64)
        y = x.double() @ self.rotation
        return (alpha1 * self.mean + (var1 / var0).sqrt() * (y - alpha0 * self.mean)) @ self.rotation.T

    def model_log_prob(self, x0, schedule):
        """Density at x0 of N(0, I) at log_snr_min pushed through the exact flow, and x1."""
        lam_min, lam_max = schedule.log_snr_min, schedule.log_snr_max
        x1 = self.flow(x0, lam_max, lam_min)
        log_jacobian = 0.5 * torch.log(self._marginal(lam_min, torch.float64)[2]
                                       / self._marginal(lam_max, torch.float64)[2]).sum()
        return standard_normal_log_prob(x1) + log_jacobian, x1


class MixtureTarget:
    """1-D mixture sum_j w_j N(m_j, s_j^2): exact eps (posterior-weighted) and marginal densities."""

    def __init__(self, weights, means, stds):
        self.w, self.m, self.s = (torch.tensor(v, dtype=torch.float64) for v in (weights, means, stds))

    def _components(self, x, log_snr):
        # components on a leading axis: reductions over it are fast on the CPU, unlike
        # softmax over a trailing axis of length 2
        w, m, s = (v.to(x.dtype).view(-1, *[1] * x.dim()) for v in (self.w, self.m, self.s))
        alpha, sigma = alpha_sigma(torch.as_tensor(log_snr, dtype=x.dtype)[..., None])
        var = alpha**2 * s**2 + sigma**2
        resid = x - alpha * m
        log_joint = torch.log(w) - 0.5 * resid**2 / var - 0.5 * torch.log(2 * math.pi * var)
        return sigma, var, resid, log_joint

    def eps(self, x, log_snr):
        sigma, var, resid, log_joint = self._components(x, log_snr)
        return sigma * (torch.softmax(log_joint, 0) * resid / var).sum(0)

    def log_prob(self, x, log_snr):
        """log density of the marginal at log_snr (+inf: the data) at x (n, 1) -> (n,)."""
        return torch.logsumexp(self._components(x, log_snr)[3], 0)[..., 0]

    def mean(self):
        return float((self.w * self.m).sum())

    def std(self):
        return math.sqrt(float((self.w * (self.s**2 + self.m**2)).sum()) - self.mean() ** 2)

    def cdf(self, c):
        return float((self.w * torch.special.ndtr((c - self.m) / self.s)).sum())


def standard_normal_log_prob(x):
    return -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def x0_hat(eps_fn, x, log_snr):
    alpha, sigma = alpha_sigma(torch.tensor(log_snr, dtype=x.dtype))
    return (x - sigma * eps_fn(x, torch.tensor(log_snr, dtype=x.dtype))) / alpha


GAUSSIAN = GaussianTarget([0.7, -1.2], [0.5, 1.8])
MIXTURE = MixtureTarget((0.3, 0.7), (-1.4, 0.6), (0.3, 0.5))  # mean 0, two well-separated modes
