"""Dynamical-system simulators, and event-conditioned sampling through DensityEstimator."""
import numpy as np
import pytest
import torch

import densiformer as dfm
from densiformer.datasets import fitzhugh_nagumo, lorenz63
from densiformer.diffusion.schedules import BandedSchedule


def test_lorenz_windows_shape_determinism_and_attractor():
    a = lorenz63.simulate(400, seed=3)
    assert a.shape == (400, 180) and a.dtype == np.float32
    np.testing.assert_array_equal(a, lorenz63.simulate(400, seed=3))
    assert not np.array_equal(a, lorenz63.simulate(400, seed=4))
    w = a.reshape(400, 60, 3) * 20
    # On the attractor: z in (0, 50), long-run mean z about 23.6, x and y symmetric about 0.
    assert w[..., 2].min() > 0 and w[..., 2].max() < 50
    assert abs(w[..., 2].mean() - 23.6) < 1.0 and abs(w[..., 0].mean()) < 1.0
    # Consecutive samples are 0.1 time units of the flow apart (up to float32 rounding).
    state = tuple(w[:, 10].astype(np.float64).T)
    for _ in range(5):
        state = lorenz63._rk4(state, 0.02)
    np.testing.assert_allclose(np.stack(state, -1), w[:, 11], atol=2e-3 * 20)


def test_lorenz_rk4_step_converges():
    state = tuple(np.array([1.0, -2.0, 20.0])[:, None])
    coarse = lorenz63._rk4(state, 0.02)
    fine = state
    for _ in range(8):
        fine = lorenz63._rk4(fine, 0.0025)
    # fourth order: the local error of one step of 0.02 is about 4e-5 (state near 20)
    assert max(float(np.abs(c - f).max()) for c, f in zip(coarse, fine)) < 1e-4


def test_lorenz_spectral_energy_matches_numpy():
    x = lorenz63.simulate(50, seed=0)
    expected = np.abs(np.fft.rfft(x.reshape(50, 60, 3)[..., 0], axis=1))[:, 1:].mean(1)
    np.testing.assert_allclose(lorenz63.spectral_energy(torch.from_numpy(x)).numpy(), expected, rtol=1e-5)


def test_fitzhugh_nagumo_windows_and_spikes():
    # a shorter burn-in than the default 2000 time units keeps the test fast
    x = fitzhugh_nagumo.simulate(500, seed=1, trajectories=100, burn_in=300.0)
    assert x.shape == (500, 240) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:200], fitzhugh_nagumo.simulate(200, seed=1, trajectories=100, burn_in=300.0))
    assert x.min() > -0.6 and x.max() < 1.1
    peak = fitzhugh_nagumo.max_mean_voltage(torch.from_numpy(x)).numpy()
    # Typical windows stay low; a few hold a joint firing of both units (about 1.4%).
    assert np.median(peak) < 0.3
    assert 0 < (peak > fitzhugh_nagumo.DEFAULT_THRESHOLD).mean() < 0.1


def test_estimator_samples_conditioned_on_an_event(tiny_estimator):
    inputs = {"a": np.array([0.0, 1.0]), "b": np.array([0.0, -1.0])}
    ev = dfm.events.Above(lambda x: x[..., 0], 0.5) & dfm.events.Below(lambda x: x[..., 1], 10.0)
    plain = tiny_estimator.sample(inputs, request=["y", "z"], num_samples=400, seed=0)
    guided = tiny_estimator.sample(inputs, request=["y", "z"], num_samples=200, event=ev, seed=0, steps=40,
                                   guidance_options={"std_grad": False})
    assert guided.shape == (2, 200, 2)
    inside = lambda s: (s[..., 0] > 0.5) & (s[..., 1] < 10.0)  # noqa: E731
    assert inside(plain).mean() < 0.5 and inside(guided).mean() > 0.95
    # physical units: an event on z = 3 b + 10 near its own scale is honoured too
    high = tiny_estimator.sample(inputs, request=["z"], num_samples=100, steps=40,
                                 event=dfm.events.Above(lambda x: x[..., 0], 13.0))
    assert (high > 13.0).mean() > 0.95
    # with the lookahead step (a second denoiser call on the rows' conditional model)
    ahead = tiny_estimator.sample(inputs, request=["y", "z"], num_samples=200, event=ev, seed=3, steps=40,
                                  guidance_options={"std_grad": False, "lookahead": 4.0})
    assert inside(ahead).mean() > 0.95
    with pytest.raises(ValueError, match="unknown guidance"):
        tiny_estimator.sample(inputs, request=["y"], num_samples=4, event=ev, guidance="magic")
    with pytest.raises(TypeError, match="expected an event"):
        tiny_estimator.sample(inputs, request=["y"], num_samples=4, event=lambda x: x)


def test_estimator_event_probability(tiny_estimator):
    inputs = {"a": np.array([0.0, 1.0]), "b": np.array([0.0, -1.0])}
    ev = dfm.events.Above(lambda x: x[..., 0], 0.5)
    mc, mc_se = tiny_estimator.event_probability(inputs, request=["y"], event=ev, num_samples=2000,
                                                 estimator="monte_carlo", sampler="dpmpp2m", steps=12)
    assert mc.shape == mc_se.shape == (2,)
    assert np.all((mc > 0.05) & (mc < 0.95)) and np.allclose(mc_se, np.sqrt(mc * (1 - mc) / 2000))
    # API only: this barely trained model's guided probability-flow density is not accurate
    # (accuracy is tested on exact denoisers in test_guidance.py and in bench_events.py).
    fast = {"num_samples": 16, "sampler": "dpmpp2m", "steps": 12, "ode_options": {"method": "fixed", "steps": 4}}
    p, se = tiny_estimator.event_probability(inputs, request=["y"], event=ev, **fast)
    assert p.shape == se.shape == (2,) and np.all(se > 0) and np.all(np.isfinite(p))
    log_p, log_se = tiny_estimator.event_probability(inputs, request=["y"], event=ev, log=True, **fast)
    np.testing.assert_allclose(np.exp(log_p), p, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown estimator"):
        tiny_estimator.event_probability(inputs, request=["y"], event=ev, estimator="guess")
    # the lookahead field is deterministic: the probability-flow ODE takes it (and its divergence)
    p_ahead, se_ahead = tiny_estimator.event_probability(inputs, request=["y"], event=ev,
                                                         guidance_options={"lookahead": 4.0}, **fast)
    assert np.all(np.isfinite(p_ahead)) and np.all(se_ahead > 0)


def test_estimator_smc_sampling_and_probability_agree_with_monte_carlo(tiny_estimator):
    # Both on the same 40-step DDPM chain: the SMC estimate of P(E | inputs) per row must
    # agree with the plain fraction of unguided draws, within the two standard errors.
    # Interval guidance: this barely trained model's Jacobian makes the moment twist wildly
    # overconfident (log p(E | x_t) of -25 where the truth is log 0.3), and SMC, unbiased
    # but then heavy-tailed, gave 2e-4 for 0.32 at 400 particles. Moment + SMC is tested
    # for accuracy on exact denoisers (test_guidance.py) and on Lorenz-63 (bench_events.py).
    inputs = {"a": np.array([0.0, 1.0]), "b": np.array([0.0, -1.0])}
    ev = dfm.events.Above(lambda x: x[..., 0], 0.5)
    mc, mc_se = tiny_estimator.event_probability(inputs, request=["y"], event=ev, num_samples=4000,
                                                 estimator="monte_carlo", sampler="ddpm", steps=40, seed=1)
    p, se = tiny_estimator.event_probability(inputs, request=["y"], event=ev, num_samples=400, estimator="smc",
                                             steps=40, guidance="interval")
    assert np.all(se > 0) and np.all(np.abs(p - mc) < 4 * np.hypot(se, mc_se))
    x = tiny_estimator.sample(inputs, request=["y"], num_samples=64, event=ev, smc=True, steps=40, guidance="interval")
    assert x.shape == (2, 64, 1) and (x[..., 0] > 0.5).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_estimator.event_probability(inputs, request=["y"], event=ev, num_samples=10, estimator="smc")
    with pytest.raises(ValueError, match="DDPM"):
        tiny_estimator.sample(inputs, request=["y"], num_samples=8, event=ev, smc=True, sampler="heun")
    with pytest.raises(ValueError, match="needs an event"):
        tiny_estimator.sample(inputs, request=["y"], num_samples=8, smc=True)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_window_denoiser_starts_as_the_exact_gaussian_denoiser(architecture):
    # Untrained (zero output layer), the preconditioned denoiser is the exact eps of the
    # Gaussian fitted to its training windows, at every noise level: for N(mu, S),
    # eps = sigma (alpha^2 S + sigma^2 I)^-1 (z - alpha mu). The MLP fits a diagonal S
    # (its inputs are PCA-whitened), the convolution the full covariance.
    from densiformer.diffusion.schedules import alpha_sigma
    from densiformer.model.window_denoiser import WindowConfig, build_denoiser

    gen = torch.Generator().manual_seed(0)
    if architecture == "conv":
        mix = torch.randn(12, 12, generator=gen) / 3
    else:
        mix = torch.diag(torch.rand(12, generator=gen) + 0.05)
    data = torch.randn(4000, 12, generator=gen) @ mix.T + torch.randn(12, generator=gen)
    net = build_denoiser(WindowConfig("test", 12, width=16, layers=2, architecture=architecture, length=4))
    net.set_data_moments(data)
    mu, cov = data.mean(0), torch.cov(data.T)
    if architecture == "mlp":
        cov = torch.diag(cov.diagonal())
    z = torch.randn(5, 12, generator=gen)
    for lam in (-9.0, -1.0, 0.5, 9.0):
        log_snr = torch.tensor(lam)
        alpha, sigma = alpha_sigma(log_snr)
        expected = sigma * torch.linalg.solve(alpha**2 * cov + sigma**2 * torch.eye(12), (z - alpha * mu).T).T
        torch.testing.assert_close(net(z, log_snr), expected, atol=1e-5, rtol=1e-4)
        # Batched log-SNR (training) gives the same.
        torch.testing.assert_close(net(z, log_snr.expand(5)), expected, atol=1e-5, rtol=1e-4)
        x0_gauss, c_out, f = net.x0_and_target_scale(z, log_snr.expand(5))
        torch.testing.assert_close(alpha * x0_gauss + sigma * expected, z, atol=1e-5, rtol=1e-5)
        assert (f == 0).all() and (c_out > 0).all()


def test_window_model_asinh_stretch_round_trips_and_keeps_old_cache_keys(tmp_path, monkeypatch):
    # The stretched model trains on scale * asinh(x / scale) and maps back through sinh:
    # to_physical (and from_physical back) must invert the stretch and the whitening exactly, including spikes
    # far out in the tail. Configs without the stretch keep the cache key they had
    # before the field existed (weights trained by earlier versions stay valid).
    from densiformer.model.window_denoiser import WindowConfig, load_or_train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rng = np.random.default_rng(0)

    def simulate(n, seed):  # quiet noise with rare 10-sigma spikes, 4 steps x 2 channels
        x = 0.1 * rng.standard_normal((n, 8))
        x[rng.random(n) < 0.02] += 1.0
        return x.astype(np.float32)

    config = WindowConfig("test", 8, train_windows=500, width=8, layers=2, steps=2, architecture="conv", length=4,
                          asinh_scale=0.1)
    model = load_or_train(config, simulate, progress=False)
    x = torch.from_numpy(simulate(64, 1)).double()
    u = 0.1 * torch.asinh(x / 0.1)
    z = torch.linalg.solve(model.basis.double(), (u - model.mean.double()).T).T
    torch.testing.assert_close(model.to_physical(z), x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(model.from_physical(x), z, atol=1e-9, rtol=1e-9)
    assert load_or_train(config, simulate, progress=False).seconds == model.seconds  # from the cache
    assert WindowConfig("lorenz63", 180).key() == "a9a8fcf00d4b174f"
    assert WindowConfig("lorenz63", 180, asinh_scale=0.1).key() != "a9a8fcf00d4b174f"
    with pytest.raises(ValueError, match="asinh_scale"):
        WindowConfig("test", 8, asinh_scale=-1.0)


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for one test: under nohup or `cmd &` SIGINT starts ignored,
    and the trainer rightly leaves an ignored signal alone, so raising it would do nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_window_denoiser_training_resumes_from_its_checkpoint(tmp_path, monkeypatch, python_sigint_handler):
    # A run killed after its last periodic checkpoint, or stopped by SIGINT, resumes from
    # checkpoint.safetensors and ends, on the CPU, with exactly the weights of an
    # uninterrupted run; load_or_train deletes the checkpoint once the weights are cached.
    import signal

    from safetensors import safe_open

    from densiformer.model import window_denoiser as wd

    monkeypatch.setattr(wd, "CHECKPOINT_EVERY", 4)
    config = wd.WindowConfig("test", 8, train_windows=300, width=8, layers=2, steps=13, architecture="conv", length=4)
    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    straight, _ = wd.train(config, z, False)

    def interrupting_at_call(n, action):  # get_schedule whose log_snr (once a training step) acts on its n-th call
        schedule, calls = wd.get_schedule(config.schedule), []

        class Interrupting:
            def log_snr(self, t):
                calls.append(1)
                if len(calls) == n:
                    action()
                return schedule.log_snr(t)
        return lambda name: Interrupting()

    def steps_saved(path):
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])

    def same_weights(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    def crash():
        raise RuntimeError("killed")

    checkpoint = tmp_path / "checkpoint.safetensors"
    with monkeypatch.context() as m:
        m.setattr(wd, "get_schedule", interrupting_at_call(7, crash))  # in step 6
        with pytest.raises(RuntimeError, match="killed"):
            wd.train(config, z, False, checkpoint=checkpoint)
    assert steps_saved(checkpoint) == 4  # the periodic one before the crash
    with monkeypatch.context() as m:  # SIGINT during step 9 (the resumed run's 6th): it finishes, is saved, Ctrl-C goes on
        m.setattr(wd, "get_schedule", interrupting_at_call(6, lambda: signal.raise_signal(signal.SIGINT)))
        with pytest.raises(KeyboardInterrupt):
            wd.train(config, z, False, checkpoint=checkpoint)
    assert steps_saved(checkpoint) == 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed, _ = wd.train(config, z, False, checkpoint=checkpoint)
    assert same_weights(resumed, straight)
    other = wd.WindowConfig("test", 8, train_windows=300, width=8, layers=2, steps=14, architecture="conv", length=4)
    with pytest.raises(ValueError, match="another config"):
        wd.train(other, z, False, checkpoint=checkpoint)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    simulate = lambda n, seed: np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(wd, "get_schedule", interrupting_at_call(6, crash))  # in step 5
        with pytest.raises(RuntimeError, match="killed"):
            wd.load_or_train(config, simulate, progress=False)
    folder = tmp_path / "cache" / "densiformer" / "window_denoiser" / config.key()
    assert steps_saved(folder / "checkpoint.safetensors") == 4
    assert not (folder / "model.safetensors").exists()
    model = wd.load_or_train(config, simulate, progress=False)
    assert not (folder / "checkpoint.safetensors").exists() and (folder / "model.safetensors").is_file()
    # --retrain discards a checkpoint left there (here one of another config, which a resume would refuse)
    import json

    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, str(folder / "checkpoint.safetensors"),
              metadata={"step": "3", "seconds": "0.0", "config": json.dumps(other.fields())})
    fresh = wd.load_or_train(config, simulate, progress=False, retrain=True)
    assert same_weights(fresh.denoiser, model.denoiser)
    assert not (folder / "checkpoint.safetensors").exists()


def test_window_denoiser_training_saves_its_checkpoint_when_terminated(tmp_path):
    # A job's time limit sends SIGTERM: the training process finishes its step, saves it
    # (with no periodic checkpoint due) and then dies of the signal as it would have.
    import signal
    import subprocess
    import sys
    import textwrap

    from safetensors import safe_open

    script = textwrap.dedent(f"""
        import torch
        from densiformer.model import window_denoiser as wd
        wd.CHECKPOINT_EVERY = 10**9
        schedule = wd.get_schedule("cosine")
        class Announcing:  # says when training runs, once
            said = False
            def log_snr(self, t):
                if not self.said:
                    print("training", flush=True)
                    self.said = True
                return schedule.log_snr(t)
        wd.get_schedule = lambda name: Announcing()
        config = wd.WindowConfig("test", 8, width=8, layers=2, steps=10**7, architecture="conv", length=4)
        wd.train(config, torch.randn(300, 8), False, checkpoint=wd.Path({str(tmp_path / "checkpoint.safetensors")!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "training\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM
    with safe_open(str(tmp_path / "checkpoint.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) >= 1


def test_tail_tilt_weights_are_the_training_weights_and_keep_old_keys(tmp_path, monkeypatch):
    # The correction must use the very w the denoiser was trained with: log_tilt of the
    # training windows (in the model's coordinates) gives back the sampling weights, the
    # windows beyond the tail quantile weigh about tail_weight, the bulk near 1 (the step is
    # smooth, TILT_WIDTH wide in log distance), the Gaussian skip has the tilted moments,
    # and the tilt survives the cache.
    from densiformer.model.window_denoiser import WindowConfig, fit_tilt, load_or_train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def simulate(n, seed):  # quiet noise with rare 10-sigma spikes, 4 steps x 2 channels
        rng = np.random.default_rng(seed)
        x = 0.1 * rng.standard_normal((n, 8))
        x[rng.random(n) < 0.02] += 1.0
        return x.astype(np.float32)

    shape = {"train_windows": 4000, "width": 8, "layers": 2, "steps": 2, "architecture": "conv", "length": 4}
    config = WindowConfig("test", 8, **shape, tail_weight=10.0, tail_quantile=0.95)
    model = load_or_train(config, simulate, progress=False)
    x = torch.from_numpy(simulate(config.train_windows, config.seed + 1)).double()
    z = torch.linalg.solve(model.basis.double(), (x - model.mean.double()).T).T.float()
    _, weights = fit_tilt(config, z)
    torch.testing.assert_close(model.log_tilt(z).exp(), weights, rtol=1e-4, atol=1e-4)
    spikes = x.mean(-1) > 0.5  # every spike lies beyond the 95% quantile of the distance
    assert (weights[spikes] > 9.5).all() and (weights[~spikes].median() < 1.5)
    assert (weights > 5.5).float().mean() == pytest.approx(0.05, abs=0.01)
    tilted_mean = (weights[:, None] * z).sum(0) / weights.sum()
    torch.testing.assert_close(model.denoiser.data_mean, tilted_mean, rtol=1e-4, atol=1e-4)
    assert (model.denoiser.data_mean - z.mean(0)).abs().max() > 0.1  # the spikes' weight moved it
    cached = load_or_train(config, simulate, progress=False)
    assert cached.seconds == model.seconds
    torch.testing.assert_close(cached.log_tilt(z), model.log_tilt(z))
    untilted = load_or_train(WindowConfig("test", 8, **shape), simulate, progress=False)
    torch.testing.assert_close(untilted.log_tilt(z), torch.zeros(4000))
    torch.testing.assert_close(untilted.denoiser.data_mean, z.mean(0))
    assert WindowConfig("lorenz63", 180, tail_quantile=0.9).key() == "a9a8fcf00d4b174f"  # no tilt: old key
    assert WindowConfig("lorenz63", 180, tail_weight=10.0).key() != "a9a8fcf00d4b174f"
    with pytest.raises(ValueError, match="tail_weight"):
        WindowConfig("test", 8, tail_weight=0.5)


def test_events_command_weights_a_tilted_denoiser_back(tmp_path, monkeypatch):
    # SMC gets -log w as its last weight and its P(E) is divided by E_model[1 / w]; the
    # probability-flow rows, which cannot take the weights, are refused before any work.
    from densiformer.guidance import cli
    from densiformer.guidance import smc as smc_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tiny = {"steps": 10, "train_windows": 2000, "width": 8, "layers": 2, "tail_weight": 5.0}
    with pytest.raises(ValueError, match="tail-tilted"):
        cli.run("lorenz63", num_samples=8, smc_particles=0, prob_samples=2, truth_windows=20_000, progress=False,
                denoiser=tiny)
    assert not (tmp_path / "cache").exists()
    seen = {}

    def spy(*args, _sampler=smc_module.sample_twisted, **kwargs):
        result = _sampler(*args, **kwargs)
        seen["log_weight"], seen["result"] = kwargs["log_weight"], result
        return result

    monkeypatch.setattr(smc_module, "sample_twisted", spy)
    result = cli.run("lorenz63", num_samples=64, smc_particles=16, truth_windows=20_000, progress=False,
                     denoiser=tiny)
    # E_model[1 / w] lies between 1 / tail_weight and 1.
    assert 0.2 < result["tilt_normaliser"] < 1
    smc = result["rows"][-1]
    assert smc["method"] == "moment + SMC"
    assert smc["p"] == pytest.approx(float(seen["result"].p) / result["tilt_normaliser"], rel=1e-9)
    x = seen["result"].x
    from densiformer.model.window_denoiser import WindowConfig, load_or_train
    from densiformer.datasets import lorenz63

    model = load_or_train(WindowConfig("lorenz63", lorenz63.DIM, **{**cli._system("lorenz63", None).denoiser, **tiny}),
                          lorenz63.simulate, progress=False)
    torch.testing.assert_close(seen["log_weight"](x), -model.log_tilt(x))
    assert (model.log_tilt(x) > 0).any()
    assert all(np.isfinite(r["p"]) and 0 <= r["p"] <= 1 for r in (*result["rows"][:2], smc))
    assert "tail-tilted" in cli.format_table(result)


def test_events_command_writes_the_table_and_histogram(tmp_path, monkeypatch):
    # The plumbing of `densiformer events` on a model trained for a few steps (the
    # statistics need the full run: benchmarks/bench_events.py); the simulator's event rate
    # from 20,000 windows must still be the paper's 9.7%.
    import dataclasses
    import json

    from densiformer.guidance import cli, scores
    from densiformer.guidance import smc as smc_module
    from densiformer.guidance.cli import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Without smc_twist_from and sampling_band the SMC sampler twists from the system's own
    # log-SNR and every sampler steps on the system's banded grid.
    system = cli._system
    monkeypatch.setattr(cli, "_system", lambda *a: dataclasses.replace(system(*a), smc_twist_from=-6.0,
                                                                         sampling_band=(-8.0, -4.0)))
    # Every DDPM sampler, plain and SMC, takes sampling_steps and the banded schedule; the
    # ODE Monte Carlo row takes its own steps on the model's schedule.
    calls = []
    for module, name in ((scores, "sample_with_event"), (smc_module, "sample_twisted")):
        def spy(denoiser, schedule, *args, _sampler=getattr(module, name), **kwargs):
            band = (schedule.lo, schedule.hi, schedule.density) if isinstance(schedule, BandedSchedule) else None
            calls.append((kwargs.get("sampler", "ddpm"), kwargs["steps"], band, args[1][0]))  # args[1]: shape
            return _sampler(denoiser, schedule, *args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    result = run("lorenz63", out=tmp_path / "out", num_samples=8, smc_particles=16, truth_windows=20_000,
                 progress=False, denoiser={"steps": 10, "train_windows": 2000, "width": 8, "layers": 2},
                 sampling_steps=40, mc_samples=12)
    # A warm-up draw of 2, mc_samples unguided (in batches of num_samples, as the plain rows
    # are timed), num_samples per plain method, the SMC particles.
    banded = (-8.0, -4.0, cli.BAND_DENSITY)
    assert sorted(calls) == sorted([("ddpm", 40, banded, n) for n in (2, 8, 4, 8, 8, 8, 8, 8, 8, 16)]
                                   + [("heun", cli.ODE_MC[1], None, n) for n in (8, 4)])
    assert result["sampling_steps"] == 40 and result["sampling_band"] == [-8.0, -4.0] and result["mc_samples"] == 12
    assert abs(result["p_true"] - 0.0967) < 4 * result["p_true_se"] + 1e-3
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["unguided", "unguided ODE (heun 50)", "moment", "moment (std stopped)", "moment (lookahead 4)",
                       "moment (std stopped, lookahead 4)", "dps", "interval", "moment + SMC"]
    smc = result["rows"][-1]
    assert smc["particles"] == 16 and 1 <= smc["distinct"] <= 16 and smc["p_estimator"] == "SMC"
    assert 0 < smc["ess"] <= 16
    assert smc["twist_from"] == -6.0
    saved = json.loads((tmp_path / "out" / "events_lorenz63.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "out" / "events_lorenz63.png").stat().st_size > 10_000
    # the weights are cached under XDG_CACHE_HOME and reloaded, not retrained
    assert list((tmp_path / "cache" / "densiformer" / "window_denoiser").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_window_denoiser_trains_and_samples_on_cuda_like_on_the_cpu(tmp_path, monkeypatch):
    # Training draws its random stream on the CPU, so the CUDA-trained denoiser is the
    # CPU one up to rounding (TF32 convolutions included: 2e-2 on unit-scale eps after 50
    # Adam steps), and `densiformer events --device cuda` runs end to end.
    from densiformer.guidance.cli import run
    from densiformer.model.window_denoiser import WindowConfig, load_or_train

    config = WindowConfig("lorenz63", lorenz63.DIM, train_windows=2000, width=16, layers=2, steps=50,
                          architecture="conv", length=lorenz63.STEPS)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cpu"))
    cpu = load_or_train(config, lorenz63.simulate, progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cuda"))
    gpu = load_or_train(config, lorenz63.simulate, progress=False, device="cuda")
    z, log_snr = torch.randn(64, lorenz63.DIM), torch.linspace(-8, 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(gpu.denoiser(z.cuda(), log_snr.cuda()).cpu(), cpu.denoiser(z, log_snr),
                                   atol=2e-2, rtol=0)
    result = run("lorenz63", num_samples=8, smc_particles=16, truth_windows=20_000, progress=False,
                 denoiser={"steps": 10, "train_windows": 2000, "width": 8, "layers": 2}, device="cuda")
    assert [r["method"] for r in result["rows"]][-1] == "moment + SMC"
    assert all(np.isfinite(r["ms_per_sample"]) for r in result["rows"])


@pytest.mark.parametrize("flags, message", [
    (["--smc-particles", "6"], "multiple of 4"),
    (["--smc-guidance", "moment,magic"], "unknown method"),
    (["--smc-twist-from", "nan"], "--smc-twist-from"),
    (["--sampling-steps", "1"], "--sampling-steps"),
    (["--sampling-band=-2,-6"], "finite LO < HI"),
    (["--sampling-band", "wide"], "LO,HI (two log-SNRs) or none"),
    (["--width", "12"], "multiple of 8"),
    (["--train-steps", "0"], "--train-steps and --layers positive"),
    (["--layers", "0"], "--train-steps and --layers positive"),
    (["--num-samples", "1"], "--num-samples"),
    (["--event", "spike"], "has the event 'low-energy'"),
    (["--device", "tpu"], "cpu or cuda"),
    (["--device", "cuda:7"], "no such CUDA device"),
])
def test_events_command_rejects_bad_options_before_any_work(flags, message, capsys):
    from densiformer.cli import main

    assert main(["events", "lorenz63", *flags]) == 2
    assert message in capsys.readouterr().err


def test_sampling_band_option_reads_a_band_none_or_the_systems():
    from densiformer.guidance.cli import _parse_band, _system

    assert _parse_band(None) == "system" and _parse_band("None") is None and _parse_band("-8,-4.5") == (-8.0, -4.5)
    assert _system("fitzhugh-nagumo", None).sampling_band == (-8.0, -4.0)
    assert _system("lorenz63", None).sampling_band is None
