"""Column schema: median/MAD normalisation and its exact round trip."""
import numpy as np
import pytest

from densiformer.data.schema import MAD_TO_STD, ColumnSchema


def test_median_mad_and_round_trip():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(5, 2, 10_000), rng.standard_cauchy(10_000)], 1)
    x[::7, 0] = np.nan
    schema = ColumnSchema.fit(["a", "b"], x)
    a = x[:, 0][~np.isnan(x[:, 0])]
    assert schema.center[0] == pytest.approx(np.median(a))
    assert schema.scale[0] == pytest.approx(MAD_TO_STD * np.median(np.abs(a - np.median(a))))
    # the scale of a Gaussian column is its standard deviation, within sampling error
    assert schema.scale[0] == pytest.approx(2.0, rel=0.05)
    z = schema.normalize(x)
    np.testing.assert_allclose(schema.denormalize(z), x, rtol=1e-6, atol=1e-5)
    assert np.isnan(z[::7, 0]).all()
    assert ColumnSchema.from_dict(schema.to_dict()) == schema


def test_subset_and_jacobian():
    schema = ColumnSchema(("a", "b", "c"), (1.0, 2.0, 3.0), (2.0, 4.0, 8.0))
    np.testing.assert_allclose(schema.denormalize([[1.0, 1.0]], ["c", "a"]), [[11.0, 3.0]])
    assert schema.log_abs_det(["a", "c"]) == pytest.approx(-np.log(16.0))
    with pytest.raises(ValueError, match="unknown column"):
        schema.normalize([[0.0]], ["d"])


def test_degenerate_columns():
    x = np.array([[1.0, np.nan], [1.0, np.nan], [1.0, np.nan], [2.0, 3.0]])
    schema = ColumnSchema.fit(["mostly_one", "b"], x)
    assert schema.scale[0] > 0
    with pytest.raises(ValueError, match="'c'.*no observed values.*4 rows"):
        ColumnSchema.fit(["a", "c"], np.array([[1.0, np.nan]] * 4))
