"""Samplers driven by exact denoisers of Gaussian and Gaussian-mixture targets.

With the exact eps the only errors left are the sampler's own discretisation and the
prior mismatch at lambda_min: x_T ~ N(0, I) while the true marginal there is
N(alpha m, .), alpha = 0.0067, which shifts the samples by about 0.0067 * m * s, far
below the statistical tolerances used here.

Measured discretisation bias of the std (exact denoiser, N(0.7, 0.5^2), cosine schedule):
ddpm 120 -3.0%, 200 -1.9%, 500 -0.7%; ddim 50 -3.1%, 200 -0.8%; heun 10 +25%, 20 +5%,
40 +1.1%, 80 +0.3%; dpmpp2m 10 +3.6%, 20 +1.5%, 40 +0.4%. The moment tests therefore run
at step counts where the bias is about one standard error or less; the few-step regime is checked
against the exact transport map (test_deterministic_samplers_converge) and, for ddpm at
the paper's step counts, against the chain's own exact output law.
"""
import math

import pytest
import torch

from densiformer.diffusion import samplers
from densiformer.diffusion.empirical import EmpiricalDenoiser
from densiformer.diffusion.schedules import BandedSchedule, CosineSchedule, DiscreteDDPMSchedule, alpha_sigma

from analytic import (GAUSSIAN, MIXTURE, SCHEDULE_IDS, SCHEDULES, x0_hat)

# Step counts at which each sampler's bias is about one standard error at N = 20000 or less.
# (The Gaussian test leaves ddpm to test_ddpm_chain_converges_to_the_target, which is exact.)
CONVERGED = {"ddpm": 600, "ddim": 400, "heun": 80, "dpmpp2m": 50}
N = 20000
GRID_KINDS = {"ddpm": "time", "ddim": "time", "heun": "karras", "dpmpp2m": "time"}


def draw(name, target, schedule, steps, k=1):
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, k, generator=generator)
    with torch.no_grad():
        return samplers.sample(name, target.eps, x_T, schedule, steps, generator=generator).double()


def assert_mean_std(x, mean, std):
    """Sample mean and std within 4 standard errors, the errors taken from the sample."""
    n = len(x)
    se_mean = x.std(0) / math.sqrt(n)
    se_std = ((x - x.mean(0)) ** 2).std(0) / math.sqrt(n) / (2 * x.std(0))
    mean, std = torch.as_tensor(mean, dtype=x.dtype), torch.as_tensor(std, dtype=x.dtype)
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all(), (x.mean(0), mean, se_mean)
    assert ((x.std(0) - std).abs() < 4 * se_std).all(), (x.std(0), std, se_std)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp2m"])
def test_gaussian_moments(name, schedule):
    x = draw(name, GAUSSIAN, schedule, CONVERGED[name], k=2)
    assert_mean_std(x, GAUSSIAN.mean, GAUSSIAN.std)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("name", sorted(CONVERGED))
def test_mixture_moments_and_weights(name, schedule):
    x = draw(name, MIXTURE, schedule, CONVERGED[name])
    assert_mean_std(x, [MIXTURE.mean()], [MIXTURE.std()])
    # mass of the left mode: the fraction below the density's trough
    p = MIXTURE.cdf(-0.55)
    assert abs(float((x < -0.55).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / N)


def classic_ddpm(eps_fn, x, betas, generator):
    """Ho et al. (2020) Algorithm 2 with the posterior variance beta_tilde, from the betas."""
    alpha_bar = torch.cumprod(1 - betas, 0)
    for i in range(len(betas) - 1, -1, -1):
        beta, ab = float(betas[i]), float(alpha_bar[i])
        log_snr = torch.tensor(math.log(ab / (1 - ab)), dtype=x.dtype)
        x = (x - beta / math.sqrt(1 - ab) * eps_fn(x, log_snr)) / math.sqrt(1 - beta)
        if i > 0:
            beta_tilde = (1 - float(alpha_bar[i - 1])) / (1 - ab) * beta
            x = x + math.sqrt(beta_tilde) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def test_ddpm_is_the_classic_discrete_sampler():
    schedule = DiscreteDDPMSchedule(120)
    x_T = torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = samplers.sample_ddpm(MIXTURE.eps, x_T, schedule, 120, generator=torch.Generator().manual_seed(1))
    ref = classic_ddpm(MIXTURE.eps, x_T, schedule.betas, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def ddpm_output_law(target, schedule, steps):
    """Mean and std of sample_ddpm's output for a diagonal Gaussian target, exactly.

    The chain is linear-Gaussian: x0_hat = c x + d with c = alpha s^2 / V, d = m sigma^2 / V.
    """
    lams = samplers.log_snr_grid(schedule, steps, "time").tolist()
    mean, var = torch.zeros_like(target.mean), torch.ones_like(target.mean)
    for lam_t, lam_s in zip(lams[:-1], lams[1:]):
        alpha_t, sigma_t = alpha_sigma(torch.tensor(lam_t, dtype=torch.float64))
        alpha_s, sigma_s = alpha_sigma(torch.tensor(lam_s, dtype=torch.float64))
        v = alpha_t**2 * target.std**2 + sigma_t**2
        c, d = alpha_t * target.std**2 / v, target.mean * sigma_t**2 / v
        r = math.exp(lam_t - lam_s)
        gain = alpha_s * (r / alpha_t + (1 - r) * c)
        mean = gain * mean + alpha_s * (1 - r) * d
        var = gain**2 * var + sigma_s**2 * (1 - r)
    return mean, var.sqrt()


@pytest.mark.parametrize("schedule,steps", [(DiscreteDDPMSchedule(120), 120), (CosineSchedule(), 200)],
                         ids=["ddpm120-120", "cosine-200"])
def test_ddpm_at_paper_step_counts_follows_its_chains_law(schedule, steps):
    """At these step counts the chain itself is biased (std -3% and -2% here, -7.5% for a
    target with s = 0.1), so the ground truth is the chain's exact output law."""
    mean, std = ddpm_output_law(GAUSSIAN, schedule, steps)
    assert_mean_std(draw("ddpm", GAUSSIAN, schedule, steps, k=2), mean, std)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_ddpm_chain_converges_to_the_target(schedule):
    """The chain's exact output law approaches the target as the steps grow (std bias
    measured: -3%, -0.7%, -0.4% at 120, 500, 1000 steps)."""
    biases = [ddpm_output_law(GAUSSIAN, schedule, steps)[1] / GAUSSIAN.std - 1 for steps in (120, 500, 1000)]
    assert (biases[0].abs() > biases[1].abs()).all() and (biases[1].abs() > biases[2].abs()).all()
    assert float(biases[2].abs().max()) < 5e-3
    mean = ddpm_output_law(GAUSSIAN, schedule, 1000)[0]
    # x_T ~ N(0, I) rather than N(alpha m, .) at lambda_min; the chain forgets most of it
    assert float(((mean - GAUSSIAN.mean) / GAUSSIAN.std).abs().max()) < 1e-3


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_ddim_with_eta_one_is_ddpm(schedule):
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = samplers.sample_ddim(GAUSSIAN.eps, x_T, schedule, 50, eta=1.0,
                                generator=torch.Generator().manual_seed(1))
    ddpm = samplers.sample_ddpm(GAUSSIAN.eps, x_T, schedule, 50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


ORDERS = {"ddim": 1, "heun": 2, "dpmpp2m": 2}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_deterministic_samplers_converge(name):
    """Error against the exact transport (flow to the grid's last lambda, then denoise)."""
    kind, order = GRID_KINDS[name], ORDERS[name]
    schedule = CosineSchedule()
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (20, 40, 80):
        last = float(samplers.log_snr_grid(schedule, steps, kind)[-2])
        exact = x0_hat(GAUSSIAN.eps, GAUSSIAN.flow(x_T, schedule.log_snr_min, last), last)
        errors.append(float((samplers.sample(name, GAUSSIAN.eps, x_T, schedule, steps) - exact).abs().max()))
    # doubling the steps divides the error by 2^order (measured: 0.53-0.56 and 0.22-0.26)
    ratio_bound = {1: 0.65, 2: 0.35}[order]
    assert errors[1] < ratio_bound * errors[0] and errors[2] < ratio_bound * errors[1], errors


def test_heun_and_dpmpp2m_agree_on_the_mixture():
    """Two second-order solvers of the same ODE, at many steps, give the same transport."""
    schedule = CosineSchedule()
    x_T = torch.randn(500, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heun = samplers.sample_heun(MIXTURE.eps, x_T, schedule, 200)
    dpm = samplers.sample_dpmpp_2m(MIXTURE.eps, x_T, schedule, 200)
    assert float((heun - dpm).abs().max()) < 3e-3  # measured 1.3e-3, 3.2e-4 at 400 steps


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_follow_the_generator(name, opts):
    def run(seed):
        return samplers.sample(name, MIXTURE.eps, torch.ones(200, 1), CosineSchedule(), 20,
                               generator=torch.Generator().manual_seed(seed), **opts)

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


@pytest.mark.parametrize("name,opts", [("ddim", {}), ("heun", {}), ("dpmpp2m", {})])
def test_deterministic_samplers_ignore_the_generator(name, opts):
    x_T = torch.randn(200, 1, generator=torch.Generator().manual_seed(0))
    a, b = (samplers.sample(name, MIXTURE.eps, x_T, CosineSchedule(), 10,
                            generator=torch.Generator().manual_seed(seed), **opts) for seed in (3, 4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 7])
def test_nfe_counts_network_calls(name, steps):
    calls = []

    def counting_eps(x, log_snr):
        calls.append(float(log_snr))
        assert log_snr.dim() == 0 and log_snr.dtype == x.dtype and math.isfinite(calls[-1])
        return GAUSSIAN.eps(x, log_snr)

    samplers.sample(name, counting_eps, torch.randn(10, 2), CosineSchedule(), steps)
    assert len(calls) == samplers.nfe(name, steps)
    grid = samplers.log_snr_grid(CosineSchedule(), steps, GRID_KINDS[name])
    assert sorted(set(calls)) == pytest.approx(grid[:-1].tolist(), rel=1e-6, abs=1e-6)


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match="ddpm.*dpmpp2m.*heun"):
        samplers.sample("euler", GAUSSIAN.eps, torch.randn(3, 2), CosineSchedule(), 5)
    with pytest.raises(ValueError, match="ddim"):
        samplers.nfe("euler", 5)


def test_clip_x0_bounds_ddpm_output():
    x = samplers.sample_ddpm(GAUSSIAN.eps, torch.randn(1000, 2), CosineSchedule(), 20, clip_x0=0.5,
                             generator=torch.Generator().manual_seed(0))
    assert float(x.abs().max()) <= 0.5


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_module_denoiser_under_no_grad_keeps_dtype(name):
    """A torch module with trainable parameters: no graph is built, the dtype is kept."""
    net = torch.nn.Linear(3, 2).double()

    def eps_fn(x, log_snr):
        return net(torch.cat([x, log_snr.expand(*x.shape[:-1], 1)], -1))

    with torch.no_grad():
        x = samplers.sample(name, eps_fn, torch.randn(4, 5, 2, dtype=torch.float64), CosineSchedule(), 3)
    assert x.shape == (4, 5, 2) and x.dtype == torch.float64 and not x.requires_grad


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("kind", ["time", "log_snr", "karras"])
def test_log_snr_grid_runs_from_noise_to_data(kind, schedule):
    grid = samplers.log_snr_grid(schedule, 12, kind)
    assert len(grid) == 13 and grid[-1] == math.inf and (grid[1:] > grid[:-1]).all()
    assert math.isclose(grid[0], schedule.log_snr_min, abs_tol=1e-9)
    if kind != "time":  # the time grid stops at t = 1/steps, then jumps to the data
        assert math.isclose(grid[-2], schedule.log_snr_max, abs_tol=1e-9)


def test_time_grid_visits_the_discrete_ddpm_steps():
    schedule = DiscreteDDPMSchedule(120)
    grid = samplers.log_snr_grid(schedule, 120, "time")
    torch.testing.assert_close(grid[:-1], schedule.knots_lam.flip(0)[:-1], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="karras"):
        samplers.log_snr_grid(schedule, 10, "uniform")


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULE_IDS)
def test_banded_schedule_keeps_the_map_and_moves_the_steps(schedule):
    banded = BandedSchedule(schedule, -6.0, -2.0, density=5.0)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(banded.time(banded.log_snr(u)), u, rtol=0, atol=1e-9)
    lam = banded.log_snr(u)
    assert (lam[1:] < lam[:-1]).all(), "log-SNR must still fall from data to noise"
    assert math.isclose(banded.log_snr_min, schedule.log_snr_min, abs_tol=1e-9)
    assert math.isclose(banded.log_snr_max, schedule.log_snr_max, abs_tol=1e-9)
    # A uniform grid's share of points in the band: density * w / (1 + (density - 1) w), w base's share.
    w = float(schedule.time(torch.tensor(-6.0, dtype=torch.float64)) - schedule.time(torch.tensor(-2.0, dtype=torch.float64)))
    share = float(((lam > -6.0) & (lam < -2.0)).double().mean())
    assert abs(share - 5 * w / (1 + 4 * w)) < 2e-3, (share, w)


def test_banded_schedule_rejects_bad_bands():
    with pytest.raises(ValueError, match="lo < hi"):
        BandedSchedule(CosineSchedule(), -2.0, -6.0)
    with pytest.raises(ValueError, match="density"):
        BandedSchedule(CosineSchedule(), -6.0, -2.0, density=0.5)


def test_banded_ddpm_keeps_a_rare_mode_that_coarse_ddpm_loses():
    # One point at 20 and 19 at 0: the posterior over which one is bimodal near log-SNR -4, where
    # a coarse ancestral step lands between the two and the common point claims it. 20 steps on
    # the cosine grid keep about 40% of the rare mode; the same 20 steps, 8x denser in [-7, -3],
    # about 75% (the converged rate is 0.05).
    points = torch.tensor([[20.0]] + [[0.0]] * 19)
    n = 8000
    rates = {}
    for name, schedule in (("plain", CosineSchedule()), ("banded", BandedSchedule(CosineSchedule(), -7.0, -3.0))):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x = samplers.sample("ddpm", EmpiricalDenoiser(points), torch.randn(n, 1, generator=generator),
                                schedule, 20, generator=generator)
        rates[name] = float((x > 10).double().mean())
    se = math.sqrt(2 * 0.05 * 0.95 / n)
    assert rates["banded"] > rates["plain"] + 4 * se, rates
    assert abs(rates["banded"] - 0.05) < abs(rates["plain"] - 0.05), rates
