"""Ray Data scale-out: on a local 2-CPU cluster, the output equals the single-process run."""
import pandas as pd
import pyarrow.parquet as pq
import pytest

from densiformer.inference import infer

from conftest import small_table

ray = pytest.importorskip("ray", reason="Ray is the optional extra densiformer[ray]")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_output_equals_single_process(tiny_estimator, local_cluster, tmp_path):
    from densiformer.inference.ray import infer_ray

    frame = small_table(700, seed=4)
    frame.loc[3, ["a", "b"]] = float("nan")
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    frame[:400].to_parquet(catalog / "part-0.parquet", row_group_size=150)
    frame[400:].to_parquet(catalog / "part-1.parquet")
    model = tmp_path / "model"
    tiny_estimator.save(model)
    options = dict(request=["y", "z"], num_samples=32, seed=11, samples=True)
    infer(catalog, tiny_estimator, tmp_path / "single", rows_per_part=100, progress=False, **options)
    result = infer_ray(catalog, model, tmp_path / "ray", rows_per_batch=100, **options)
    single = pq.read_table(tmp_path / "single").to_pandas()
    on_ray = pq.read_table(tmp_path / "ray").to_pandas().sort_values("row", ignore_index=True)
    assert result.rows == 700 and on_ray.row.tolist() == list(range(700))
    pd.testing.assert_frame_equal(on_ray, single, check_exact=False, rtol=1e-6)
    assert on_ray.unconditional.sum() == 1


def test_ray_needs_parquet_and_a_model_directory(tiny_estimator, tmp_path):
    from densiformer.inference.ray import infer_ray

    with pytest.raises(ValueError, match="Parquet"):
        infer_ray(tmp_path / "catalog.csv", tmp_path, tmp_path / "out")
    with pytest.raises(TypeError, match="model directory"):
        infer_ray(tmp_path / "catalog.parquet", tiny_estimator, tmp_path / "out")
