"""summarize, log_prob and the sbi-style posterior: shapes, consistency and errors."""
import numpy as np
import pytest
import torch

from conftest import small_table

FAST = dict(sampler="dpmpp2m", steps=6)


def test_summarize_is_the_summary_of_sample(tiny_estimator):
    inputs = small_table(5, seed=1)[["a", "b"]]
    table = tiny_estimator.summarize(inputs, request=["y", "z"], num_samples=64, seed=3, rows_per_chunk=2, **FAST)
    draws = tiny_estimator.sample(inputs, request=["y", "z"], num_samples=64, seed=3, **FAST)
    df = table.to_pandas()
    assert len(df) == 5 and "y_mad_std" in df and "z_n_modes" in df
    np.testing.assert_allclose(df["z_median"], np.median(draws[..., 1], axis=1), rtol=1e-5)
    np.testing.assert_allclose(df["y_mean"], draws[..., 0].mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected"):
        tiny_estimator.summarize(inputs, num_samples=4, sampeler="ddpm")


def test_log_prob_shapes_nan_and_units(tiny_estimator):
    inputs = small_table(4, seed=2)[["a", "b"]]
    values = np.array([[0.1, 10.0], [np.nan, 9.0], [0.3, 11.0], [-0.5, 10.5]])
    logp = tiny_estimator.log_prob(values, inputs, request=["y", "z"], method="fixed", steps=8)
    assert logp.shape == (4,) and np.isnan(logp[1]) and np.isfinite(logp[[0, 2, 3]]).all()
    # A table with the requested names gives the same, whatever its column order.
    table = {"z": values[:, 1], "y": values[:, 0]}
    np.testing.assert_allclose(tiny_estimator.log_prob(table, inputs, request=["y", "z"], method="fixed",
                                                       steps=8), logp, rtol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        tiny_estimator.log_prob(values[:3], inputs, request=["y", "z"])
    with pytest.raises(ValueError, match="columns"):
        tiny_estimator.log_prob(values[:, :1], inputs, request=["y", "z"])


def test_posterior_shapes_follow_sbi(tiny_estimator):
    post = tiny_estimator.posterior(["y", "z"], **FAST)
    x_one = torch.tensor([0.5, -1.0])
    x_batch = torch.tensor([[0.5, -1.0], [0.0, float("nan")], [1.0, 1.0]])
    assert post.sample((7,), x=x_one).shape == (7, 2)
    assert post.sample((2, 3), x=x_one).shape == (2, 3, 2)
    assert post.sample_batched((5,), x=x_batch).shape == (5, 3, 2)
    theta = post.sample((4,), x=x_one)
    assert post.log_prob(theta, x=x_one).shape == (4,)
    assert post.log_prob_batched(torch.zeros(6, 3, 2), x=x_batch).shape == (6, 3)
    with pytest.raises(ValueError, match="no x"):
        post.sample((2,))
    with pytest.raises(ValueError, match="expected 2"):
        post.sample((2,), x=torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        post.log_prob_batched(torch.zeros(6, 2, 2), x=x_batch)


def test_batched_log_prob_equals_row_by_row(tiny_estimator):
    post = tiny_estimator.posterior(["y"], ode_method="fixed")
    x_batch = torch.tensor([[0.5, -1.0], [0.0, 2.0], [-1.0, 0.3]])
    theta = torch.tensor([[[0.4], [0.1], [-0.9]], [[1.0], [-0.3], [0.0]]])  # (2, B=3, 1)
    batched = post.log_prob_batched(theta, x=x_batch)
    for b in range(3):
        single = post.log_prob(theta[:, b], x=x_batch[b])
        torch.testing.assert_close(batched[:, b], single, rtol=1e-4, atol=1e-4)
    # ... and the sbi posterior agrees with the estimator's own log_prob.
    direct = tiny_estimator.log_prob(theta[0].numpy(), {"a": x_batch[:, 0].numpy(), "b": x_batch[:, 1].numpy()},
                                     request=["y"], method="fixed")
    np.testing.assert_allclose(batched[0].numpy(), direct, rtol=1e-4, atol=1e-4)


def test_log_prob_without_inputs_counts_rows_of_a_table(tiny_estimator):
    """With inputs=None (nothing observed), the row count comes from the values table."""
    values = {"y": np.array([0.0, 0.5, 1.0]), "z": np.array([9.0, 10.0, 11.0])}
    logp = tiny_estimator.log_prob(values, None, request=["y", "z"], method="fixed", steps=4)
    assert logp.shape == (3,) and np.isfinite(logp).all()
