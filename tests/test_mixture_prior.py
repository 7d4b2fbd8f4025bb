"""GaussianMixturePrior: the exact denoiser of a Gaussian mixture, against Bayes' rule done by hand."""
import math

import pytest
import torch

from densiformer.diffusion import samplers
from densiformer.diffusion.mixture import GaussianMixturePrior
from densiformer.diffusion.schedules import CosineSchedule, alpha_sigma


def _random_mixture(components, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    prior = GaussianMixturePrior(components, dim).double()
    covs = []
    for k in range(components):
        a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / 2
        covs.append(a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64))
    covs = torch.stack(covs)
    val, vec = torch.linalg.eigh(covs)
    weights = torch.rand(components, generator=gen, dtype=torch.float64) + 0.1
    prior.log_weights.copy_((weights / weights.sum()).log())
    prior.means.copy_(3 * torch.randn(components, dim, generator=gen, dtype=torch.float64))
    prior.eigval.copy_(val)
    prior.eigvec.copy_(vec)
    return prior, covs


def test_posterior_is_bayes_rule_over_the_components():
    # x_t | k ~ N(alpha mu_k, alpha^2 S_k + sigma^2 I); E[x0 | x_t, k] is the Gaussian
    # conditional mean; the mixture's is their average under p(k | x_t).
    prior, covs = _random_mixture(3, 4, seed=0)
    x = 4 * torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for lam in (-6.0, -1.0, 0.5, 5.0):
        alpha, sigma = alpha_sigma(torch.tensor(lam, dtype=torch.float64))
        noisy = alpha**2 * covs + sigma**2 * torch.eye(4, dtype=torch.float64)
        log_p = torch.stack([torch.distributions.MultivariateNormal(alpha * m, c).log_prob(x)
                             for m, c in zip(prior.means, noisy)], -1) + prior.log_weights
        weights = torch.softmax(log_p, -1)
        means = torch.stack([m[:, None] + alpha * c @ torch.linalg.solve(n, (x - alpha * m).T)
                             for m, c, n in zip(prior.means, covs, noisy)]).permute(2, 0, 1)  # (7, K, 4)
        expected = (weights[..., None] * means).sum(1)
        x0, eps, got_weights = prior.posterior(x, alpha[None, None].expand(7, 1), sigma[None, None].expand(7, 1))
        torch.testing.assert_close(got_weights, weights, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(x0, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=1e-9, atol=1e-9)


def test_fit_finds_a_rare_separated_component_and_its_weight():
    # 3% of the points in a far cluster: EM with two components gives it its own
    # component, weighted within binomial error of 3%.
    gen = torch.Generator().manual_seed(0)
    n, rare = 20_000, 0.03
    labels = torch.rand(n, generator=gen) < rare
    z = torch.randn(n, 3, generator=gen) + 8.0 * labels[:, None].double()
    prior = GaussianMixturePrior(2, 3).double().fit(z, seed=0)
    far = int(prior.means.sum(-1).argmax())
    share = float(labels.double().mean())
    assert abs(prior.log_weights[far].exp().item() - share) < 1e-3
    torch.testing.assert_close(prior.means[far], torch.full((3,), 8.0, dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(prior.total_eigval.sum(), torch.cov(z.T).trace(), rtol=1e-9, atol=0)
    single = GaussianMixturePrior(1, 3).double().fit(z)
    torch.testing.assert_close(single.means[0], z.mean(0))
    torch.testing.assert_close(single.eigval[0], single.total_eigval)


def test_ddpm_with_the_mixture_denoiser_keeps_a_rare_modes_weight():
    # The sampler driven by the exact mixture denoiser reproduces the mixture: a 5% mode
    # five standard deviations out keeps its share within 4 binomial standard errors.
    prior = GaussianMixturePrior(2, 1).double()
    prior.log_weights.copy_(torch.tensor([0.95, 0.05], dtype=torch.float64).log())
    prior.means.copy_(torch.tensor([[0.0], [5.0]], dtype=torch.float64))
    prior.eigval.fill_(0.25)
    prior.eigvec.fill_(1.0)

    def eps_fn(x, log_snr):
        alpha, sigma = alpha_sigma(log_snr.to(x.dtype))
        return prior.posterior(x, alpha.expand(x.shape[:-1])[..., None], sigma.expand(x.shape[:-1])[..., None])[1]

    n = 4000
    generator = torch.Generator().manual_seed(0)
    x = samplers.sample("ddpm", eps_fn, torch.randn(n, 1, generator=generator, dtype=torch.float64),
                        CosineSchedule(), 200, generator=generator)
    share = float((x > 2.5).double().mean())
    assert abs(share - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n), share


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="components and dim"):
        GaussianMixturePrior(0, 3)
