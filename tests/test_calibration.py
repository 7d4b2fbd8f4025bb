"""The bundled Hipparcos model on held-out stars: calibration, and few-step sampling.

Held-out truth is the test split (disjoint from the training split by HIP). Tolerances
come from the number of stars: a coverage fraction over n stars has standard error
sqrt(p (1 - p) / n).
"""
import numpy as np
import pytest

import densiformer as dfm
from densiformer.assets import default_model
from densiformer.diagnostics import coverage
from densiformer.two_sample import c2st

LABELS = ["abs_hpmag", "b_v", "v_i"]
NO_PARALLAX = ["hpmag", "pmra", "pmdec"]


@pytest.fixture(scope="module")
def model():
    return default_model(device="cpu")


@pytest.fixture(scope="module")
def held_out():
    test = dfm.datasets.hipparcos("test")
    return test[test[LABELS].notna().all(axis=1)].sample(1200, random_state=0)


@pytest.mark.slow
def test_central_intervals_cover_held_out_truth(model, held_out):
    samples = model.sample(held_out[NO_PARALLAX], request=LABELS, num_samples=200, seed=0)
    result = coverage(samples, held_out[LABELS].to_numpy(), levels=(0.68, 0.95))
    for level in (0.68, 0.95):
        observed = np.asarray(result[level])
        # Nominal within 3 points (the figure), which is about 2.5-3.5 standard
        # errors at 1200 stars: sqrt(0.68 * 0.32 / 1200) = 1.3 points.
        assert np.all(np.abs(observed - level) < 0.03), (level, dict(zip(LABELS, observed)))


@pytest.mark.slow
def test_default_sampler_is_indistinguishable_from_paper_ddpm(model, held_out):
    """Classifier two-sample test on (inputs, joint sample) pairs, disjoint star halves."""
    half = len(held_out) // 2
    first, second = held_out.iloc[:half], held_out.iloc[half:]

    def pairs(stars, **options):
        draw = model.sample(stars[NO_PARALLAX], request=LABELS, num_samples=1, seed=1, **options)[:, 0]
        x = model.schema.normalize(stars[NO_PARALLAX].to_numpy(), NO_PARALLAX)
        return np.hstack([x, model.schema.normalize(draw, LABELS)])

    reference = pairs(first, sampler="ddpm", steps=120)
    accuracy = c2st(reference, pairs(second))  # the default sampler and step count
    # 1200 points: chance accuracy has a standard error of 0.014, so 0.55 is 3.5 of them.
    assert accuracy <= 0.55, accuracy
