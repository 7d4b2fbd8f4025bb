"""EmpiricalDenoiser: the exact denoiser of a finite sample, against closed forms."""
import math

import pytest
import torch

from densiformer.diffusion import samplers
from densiformer.diffusion.empirical import EmpiricalDenoiser
from densiformer.diffusion.schedules import CosineSchedule, alpha_sigma


def test_two_symmetric_points_match_the_tanh_posterior_mean():
    # Points +-m: p(+m | x) = sigmoid(2 alpha m x / sigma^2), so x0_hat = m tanh(alpha m x / sigma^2).
    m = 1.7
    # chunk 5 < 13 rows of x: exercises the chunking.
    denoiser = EmpiricalDenoiser(torch.tensor([[m], [-m]], dtype=torch.float64), chunk=5)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)[:, None]
    for lam in (-6.0, -1.0, 0.5, 4.0):
        log_snr = torch.tensor(lam, dtype=torch.float64)
        alpha, sigma = (float(v) for v in alpha_sigma(log_snr))
        expected = m * torch.tanh(alpha * m * x / sigma**2)
        torch.testing.assert_close(denoiser.x0_hat(x, log_snr), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(denoiser(x, log_snr), (x - alpha * expected) / sigma, rtol=1e-10, atol=1e-10)


def test_per_row_log_snr_and_batch_shapes():
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    denoiser = EmpiricalDenoiser(points)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    lams = torch.linspace(-4, 4, 10).reshape(2, 5)
    per_row = denoiser(x, lams)
    assert per_row.shape == x.shape
    for i in range(2):
        for j in range(5):
            torch.testing.assert_close(per_row[i, j], denoiser(x[i, j][None], lams[i, j])[0])


def test_high_snr_returns_the_nearest_point():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[0.9, 0.2], [0.1, 1.5], [-0.2, 0.1]])
    x0 = EmpiricalDenoiser(points).x0_hat(x, torch.tensor(12.0))
    torch.testing.assert_close(x0, points[[1, 2, 0]], rtol=0, atol=1e-6)


def test_converged_ddpm_reproduces_the_points_mode_weights():
    # 1 point at +3 and 9 at -3: a fine-stepped exact sampler ends at +3 with probability 0.1.
    points = torch.tensor([[3.0]] + [[-3.0]] * 9)
    n = 4000
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = samplers.sample("ddpm", EmpiricalDenoiser(points), torch.randn(n, 1, generator=generator),
                            CosineSchedule(), 400, generator=generator)
    assert torch.all((x - 3).abs().minimum((x + 3).abs()) < 1e-3), "samples must be copies of the points"
    share = float((x > 0).double().mean())
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n), share


def test_rejects_bad_points():
    with pytest.raises(ValueError, match="points must be"):
        EmpiricalDenoiser(torch.zeros(5))
    with pytest.raises(ValueError, match="chunk"):
        EmpiricalDenoiser(torch.zeros(5, 2), chunk=0)
