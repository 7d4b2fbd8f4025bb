"""The exact denoiser of a Gaussian mixture: a prior that carries rare modes' weights.

For x0 ~ sum_k pi_k N(mu_k, U_k diag(lam_k) U_k^T) and x_t = alpha x0 + sigma eps, each
component gives x_t a Gaussian with covariance U_k diag(total_k) U_k^T, total_k =
alpha^2 lam_k + sigma^2, so the posterior is again a mixture, with the weights

    w_k(x_t) = softmax_k(log pi_k - 1/2 sum_i (c_ki^2 / total_ki + log total_ki)),
    c_k = U_k^T (x_t - alpha mu_k),

and the posterior mean and noise prediction are exact:

    x0_hat = sum_k w_k (mu_k + U_k (c_k alpha lam_k / total_k)),
    eps_hat = (x_t - alpha x0_hat) / sigma = sum_k w_k U_k (c_k sigma / total_k).

A single Gaussian (K = 1) is the window denoisers' Gaussian skip. With a few components
fitted by EM, a rare, well-separated mode (FitzHugh-Nagumo's joint spikes) gets its own
component and weight, so the mixture's denoiser decides "which mode" at high noise with
the data's odds: the part of the job that a network trained by score matching learns
worst, since a rare mode's share of the loss there is its small posterior weight.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GaussianMixturePrior(nn.Module):
    """x0_hat and eps_hat of a K-component Gaussian mixture in `dim` dimensions (buffers only)."""

    def __init__(self, components: int, dim: int):
        super().__init__()
        if components < 1 or dim < 1:
            raise ValueError(f"components and dim must be positive, got {components}, {dim}")
        self.register_buffer("log_weights", torch.full((components,), -float(np.log(components))))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("eigvec", torch.eye(dim).repeat(components, 1, 1))
        self.register_buffer("eigval", torch.ones(components, dim))
        # Eigenvalues of the mixture's overall covariance: the scale of the residual a
        # network on top of it learns.
        self.register_buffer("total_eigval", torch.ones(dim))

    @property
    def components(self) -> int:
        return len(self.means)

    @torch.no_grad()
    def fit(self, z: torch.Tensor, seed: int = 0) -> "GaussianMixturePrior":
        """Fit to the rows of z (n, dim): the sample moments for K = 1, else EM (scikit-learn's
        GaussianMixture, full covariances, k-means start, covariance floor 1e-4 of unit scale)."""
        data = z.double().cpu().numpy()
        if self.components == 1:
            weights, means, covs = np.ones(1), data.mean(0, keepdims=True), np.cov(data, rowvar=False)[None]
        else:
            from sklearn.mixture import GaussianMixture

            gm = GaussianMixture(self.components, covariance_type="full", reg_covar=1e-4, max_iter=200,
                                 random_state=seed).fit(data)
            if not gm.converged_:
                raise RuntimeError(f"EM did not converge in {gm.max_iter} iterations for {self.components} components")
            weights, means, covs = gm.weights_, gm.means_, gm.covariances_
        val, vec = np.linalg.eigh(covs)
        self.log_weights.copy_(torch.from_numpy(np.log(weights)))
        self.means.copy_(torch.from_numpy(means))
        self.eigval.copy_(torch.from_numpy(np.maximum(val, 0)))
        self.eigvec.copy_(torch.from_numpy(vec))
        self.total_eigval.copy_(torch.from_numpy(np.maximum(np.linalg.eigvalsh(np.cov(data, rowvar=False)), 0)))
        return self

    def posterior(self, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """(x0_hat, eps_hat, weights) for z (..., dim); alpha, sigma broadcast against (..., 1).

        The weights' logits grow as 1 / sigma^2, so they are formed in float64.
        """
        alpha, sigma = alpha[..., None], sigma[..., None]  # against the component axis
        lam, U = self.eigval.to(z.dtype), self.eigvec.to(z.dtype)
        total = alpha**2 * lam + sigma**2  # (..., K, dim)
        coords = torch.einsum("...kd,kde->...ke", z[..., None, :] - alpha * self.means.to(z.dtype), U)
        logits = self.log_weights - 0.5 * (coords.double() ** 2 / total.double() + total.double().log()).sum(-1)
        weights = torch.softmax(logits, -1).to(z.dtype)[..., None]
        x0 = (weights * (self.means.to(z.dtype) + torch.einsum("...ke,kde->...kd", coords * alpha * lam / total, U))).sum(-2)
        eps = (weights * torch.einsum("...ke,kde->...kd", coords * sigma / total, U)).sum(-2)
        return x0, eps, weights[..., 0]
