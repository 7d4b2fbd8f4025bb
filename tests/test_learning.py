"""The model learns a known conditional density: a 1-D mixture with two separated modes."""
import numpy as np
import pytest

import densiformer as dfm

# p(y | c) = w(c) N(C + 3, 0.4^2) + (1 - w(c)) N(C - 3, 0.4^2), with w = 0.25 for c < 0
# and 0.75 for c > 0. The modes are 15 standard deviations apart, so the mode of each
# sample is unambiguous; the offset C checks that samples come back in physical units.
WEIGHT_BELOW, WEIGHT_ABOVE = 0.25, 0.75
C = 50.0


def simulate(n, seed):
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, n)
    w = np.where(c < 0, WEIGHT_BELOW, WEIGHT_ABOVE)
    y = C + np.where(rng.random(n) < w, 3.0, -3.0) + 0.4 * rng.normal(size=n)
    return {"c": c, "y": y}


@pytest.fixture(scope="module")
def mixture_model():
    est = dfm.DensityEstimator(columns=["c"], targets=["y"],
                               config=dfm.ModelConfig(d_model=32, heads=4, head_width=128, head_layers=3))
    return est.fit(simulate(30_000, seed=1), epochs=12, batch_size=512, seed=0, progress=False)


# The paper's ancestral sampler. The probability-flow ODE samplers (default dpmpp2m@12)
# put 0.723 instead of 0.75 in the upper mode here, for 12 or 20 epochs of training
# alike: a mode-weight bias of deterministic sampling on modes 15 sigma apart (issue #3).
SAMPLER = dict(sampler="ddpm", steps=120)


@pytest.mark.slow
@pytest.mark.parametrize("c, weight", [(-0.5, WEIGHT_BELOW), (0.5, WEIGHT_ABOVE)])
def test_mode_fractions_match_truth(mixture_model, c, weight):
    n = 4000
    samples = mixture_model.sample({"c": np.full(4, c)}, request=["y"], num_samples=n // 4, seed=3,
                                   **SAMPLER)[..., 0]
    samples = samples.ravel() - C
    frac = (samples > 0).mean()
    stderr = np.sqrt(weight * (1 - weight) / samples.size)
    assert abs(frac - weight) < 3 * stderr, f"upper-mode fraction {frac:.3f}, truth {weight} +- {stderr:.3f}"
    # Samples sit in the modes, not between them.
    assert (np.abs(np.abs(samples) - 3.0) < 1.6).mean() > 0.98


@pytest.mark.slow
def test_unconditional_when_nothing_observed(mixture_model):
    """With c missing, the density is the marginal: the mean of the two weights."""
    samples = mixture_model.sample({"c": np.full(4, np.nan)}, request=["y"], num_samples=1000, seed=4,
                                   **SAMPLER).ravel() - C
    weight = (WEIGHT_BELOW + WEIGHT_ABOVE) / 2
    stderr = np.sqrt(weight * (1 - weight) / samples.size)
    assert abs((samples > 0).mean() - weight) < 3 * stderr
