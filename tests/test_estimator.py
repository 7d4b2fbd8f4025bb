"""DensityEstimator: shapes, reproducibility, persistence and every bad-input error."""
import json

import numpy as np
import torch
import pyarrow as pa
import pytest

import densiformer as dfm

from conftest import small_table as _table

COLUMNS, TARGETS = ["a", "b"], ["y", "z"]


@pytest.fixture
def fitted(tiny_estimator):
    return tiny_estimator


def test_sample_shape_and_units(fitted):
    inputs = _table(5, seed=1)[["a", "b"]]
    out = fitted.sample(inputs, request=["z", "y"], num_samples=7, steps=10, sampler="ddpm")
    assert out.shape == (5, 7, 2) and out.dtype == np.float32 and np.isfinite(out).all()


def test_same_seed_same_samples_and_input_forms_agree(fitted):
    df = _table(6, seed=2)[["a", "b"]]
    s1 = fitted.sample(df, request=["y"], num_samples=5, steps=8, seed=7)
    s2 = fitted.sample(pa.Table.from_pandas(df[["b", "a"]]), request=["y"], num_samples=5, steps=8, seed=7)
    s3 = fitted.sample({c: df[c].to_numpy() for c in df}, request=["y"], num_samples=5, steps=8, seed=7)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(s1, s3)
    assert not np.array_equal(s1, fitted.sample(df, request=["y"], num_samples=5, steps=8, seed=8))


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = dfm.DensityEstimator.load(tmp_path / "m", device="cpu")
    inputs = _table(4, seed=3)[["a"]]
    np.testing.assert_array_equal(fitted.sample(inputs, request=["y", "z"], num_samples=9, steps=12, seed=5),
                                  loaded.sample(inputs, request=["y", "z"], num_samples=9, steps=12, seed=5))
    assert loaded.schema == fitted.schema and loaded.history.val_loss == fitted.history.val_loss


@pytest.mark.parametrize("bad, match", [
    ({"a": [1.0, np.inf, 2.0], "b": [0.0, 1.0, 2.0]}, r"'a'.*3 rows"),
    ({"a": [1.0, -np.inf, 2.0]}, r"'a'.*3 rows"),
    ({"a": ["x", "y", "z"]}, r"'a'.*3 rows"),
    ({"a": [1.0, 2.0], "teff": [1.0, 2.0]}, r"teff.*2 rows"),
    ({"a": np.array([], dtype=float)}, r"0 rows"),
])
def test_bad_inputs_raise_before_work(fitted, bad, match):
    with pytest.raises(ValueError, match=match):
        fitted.sample(bad, request=["y"], num_samples=2, steps=2)


def test_bad_requests_and_arguments(fitted):
    with pytest.raises(ValueError, match="not among the targets"):
        fitted.sample({"a": [1.0]}, request=["a"])
    with pytest.raises(ValueError, match="distinct"):
        fitted.sample({"a": [1.0]}, request=["y", "y"])
    with pytest.raises(ValueError, match="num_samples"):
        fitted.sample({"a": [1.0]}, num_samples=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        dfm.DensityEstimator(COLUMNS, TARGETS).sample({"a": [1.0]})
    with pytest.raises(ValueError, match="duplicate"):
        dfm.DensityEstimator(["a", "a"], TARGETS)


def test_fit_rejects_bad_data():
    est = dfm.DensityEstimator(COLUMNS, TARGETS, dfm.ModelConfig(d_model=16, heads=2, head_width=32))
    df = _table(50)
    with pytest.raises(ValueError, match=r"'b'.*50 rows"):
        est.fit(df.assign(b=np.inf), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"'z'.*50 rows"):
        est.fit(df.assign(z=np.nan), epochs=1, progress=False)
    with pytest.raises(ValueError, match="0 rows"):
        est.fit(df.iloc[:0], epochs=1, progress=False)


def test_corrupt_and_incompatible_files(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    weights = (path / "model.safetensors").read_bytes()

    (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        dfm.DensityEstimator.load(path)
    (path / "model.safetensors").write_bytes(weights)

    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        dfm.DensityEstimator.load(path)

    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        dfm.DensityEstimator.load(path)

    (path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "head_width": 48}}))
    with pytest.raises(ValueError, match="does not match"):
        dfm.DensityEstimator.load(path)

    with pytest.raises(FileNotFoundError):
        dfm.DensityEstimator.load(tmp_path / "nowhere")


def test_fit_with_a_fixed_seed_is_reproducible_on_cpu():
    def fit(seed):
        est = dfm.DensityEstimator(COLUMNS, TARGETS, dfm.ModelConfig(d_model=16, heads=2, head_width=32))
        return est.fit(_table(300), epochs=2, batch_size=64, seed=seed, device="cpu", progress=False)

    a, b, c = fit(0), fit(0), fit(1)
    assert a.history.val_loss == b.history.val_loss
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name
    assert a.history.val_loss != c.history.val_loss
