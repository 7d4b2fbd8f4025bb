"""Catalog inference: streaming, resumable (including after a real kill -9), bad data, CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densiformer.cli import main
from densiformer.inference import infer
from densiformer.inference.catalog import MANIFEST

from conftest import small_table

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*the model does not know the columns")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """1,000 rows in 4 row groups, with an id, an extra column and a few unobserved rows."""
    frame = small_table(1000, seed=3)
    frame.loc[[5, 17, 900], ["a", "b"]] = np.nan  # nothing observed in these rows
    frame.insert(0, "source_id", np.arange(1000, dtype=np.int64) * 7 + 11)
    frame["flux_err"] = 1.0
    path = tmp_path_factory.mktemp("catalog") / "catalog.parquet"
    frame.to_parquet(path, row_group_size=250)
    return path, frame


@pytest.fixture(scope="module")
def model_dir(tiny_estimator, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_estimator.save(path)
    return path


def read(out) -> pd.DataFrame:
    return pq.read_table(out).to_pandas()


def test_summaries_for_every_row_equal_summarize(tiny_estimator, catalog, tmp_path):
    path, frame = catalog
    with pytest.warns(UserWarning, match=r"does not know the columns \['source_id', 'flux_err'\]"):
        result = infer(path, tiny_estimator, tmp_path / "out", request=["y", "z"], num_samples=64, seed=5,
                       rows_per_part=128, progress=False)
    got = read(tmp_path / "out")
    assert result.rows == result.computed == len(got) == 1000
    assert got.row.tolist() == list(range(1000))
    expected = tiny_estimator.summarize(frame[["a", "b"]], request=["y", "z"], num_samples=64, seed=5).to_pandas()
    pd.testing.assert_frame_equal(got[expected.columns], expected, rtol=1e-6)
    assert got.unconditional.tolist() == [i in (5, 17, 900) for i in range(1000)]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["complete"] and len(manifest["done"]) == result.parts == 8  # 250-row groups, 128-row parts


def test_output_does_not_depend_on_part_size(tiny_estimator, catalog, tmp_path):
    path, _ = catalog
    outs = []
    for rows in (64, 1000):
        infer(path, tiny_estimator, tmp_path / f"out{rows}", request=["y"], num_samples=32, rows_per_part=rows,
              progress=False, id_column="source_id")
        outs.append(read(tmp_path / f"out{rows}"))
    pd.testing.assert_frame_equal(outs[0], outs[1], rtol=1e-6)
    assert outs[0].source_id.tolist() == (np.arange(1000) * 7 + 11).tolist()


def test_samples_and_log_prob_columns(tiny_estimator, catalog, tmp_path):
    path, frame = catalog
    infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, samples=True,
          log_prob_of=["y", "z"], rows_per_part=500, progress=False)
    got = pq.read_table(tmp_path / "out")
    assert got.schema.field("y_samples").type == pa.list_(pa.float32(), 16)
    draws = np.stack(got.column("y_samples").to_numpy(zero_copy_only=False))
    inputs = frame[["a", "b", "y", "z"]]  # z, a target, conditions y too: it is observed
    np.testing.assert_allclose(draws, tiny_estimator.sample(inputs, request=["y"], num_samples=16)[..., 0],
                               rtol=1e-5, atol=1e-5)
    # The adaptive ODE solver steps a chunk together: compare over the same chunks (the row groups).
    expected = tiny_estimator.log_prob(frame[["y", "z"]].to_numpy(), frame[["a", "b"]], request=["y", "z"],
                                       rows_per_chunk=250)
    np.testing.assert_allclose(got.column("log_prob").to_numpy(), expected, rtol=1e-6)


def test_column_mapping(tiny_estimator, catalog, tmp_path):
    path, frame = catalog
    renamed = tmp_path / "renamed.csv"
    frame.rename(columns={"a": "A_obs"}).to_csv(renamed, index=False)
    with pytest.warns(UserWarning, match=r"\['source_id', 'flux_err'\]"):
        infer(renamed, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, columns={"a": "A_obs"},
              progress=False)
    infer(path, tiny_estimator, tmp_path / "ref", request=["y"], num_samples=16, progress=False)
    pd.testing.assert_frame_equal(read(tmp_path / "out"), read(tmp_path / "ref"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"maps \['nope'\]"):
        infer(path, tiny_estimator, tmp_path / "bad", columns={"nope": "a"}, progress=False)


def test_existing_output_needs_resume_and_the_same_job(tiny_estimator, catalog, tmp_path):
    path, _ = catalog
    infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, progress=False)
    with pytest.raises(ValueError, match="seed: was 0, now 1"):
        infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, seed=1, resume=True,
              progress=False)
    again = infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, resume=True,
                  progress=False)
    assert again.computed == 0 and len(read(tmp_path / "out")) == 1000


def test_wrong_type_stops_naming_file_and_rows_and_keeps_finished_parts(tiny_estimator, catalog, tmp_path):
    path, frame = catalog
    parts = tmp_path / "parts"
    parts.mkdir()
    frame[:600].to_parquet(parts / "0.parquet")
    bad = frame[600:].astype({"b": str})  # a text column where the model wants numbers
    bad.to_parquet(parts / "1.parquet")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"parts, rows 600-800: .*'b'[\s\S]*600 of 1000 rows .* kept in"):
        infer(parts, tiny_estimator, out, request=["y"], num_samples=16, rows_per_part=200, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [tuple(r[:2]) for r in manifest["done"]] == [(0, 200), (200, 400), (400, 600)]
    assert len(read(out)) == 600 and not manifest["complete"]
    # Fixed input: the resumed run computes only the rest and equals a clean run.
    frame[600:].to_parquet(parts / "1.parquet")
    resumed = infer(parts, tiny_estimator, out, request=["y"], num_samples=16, rows_per_part=200, resume=True,
                    progress=False)
    assert resumed.computed == 400
    infer(parts, tiny_estimator, tmp_path / "clean", request=["y"], num_samples=16, rows_per_part=200,
          progress=False)
    pd.testing.assert_frame_equal(read(out), read(tmp_path / "clean"))


def test_corrupt_parquet_names_file_and_rows(tiny_estimator, catalog, tmp_path):
    path, frame = catalog
    corrupt = tmp_path / "corrupt.parquet"
    frame.to_parquet(corrupt, row_group_size=250, compression="snappy")
    column = pq.read_metadata(corrupt).row_group(2).column(1)  # "a" of rows 500-749
    data = bytearray(corrupt.read_bytes())
    data[column.data_page_offset:column.data_page_offset + column.total_compressed_size] = \
        b"\xff" * column.total_compressed_size
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt\.parquet \(rows from 500\)[\s\S]*500 of 1000 rows"):
        infer(corrupt, tiny_estimator, tmp_path / "out", request=["y"], num_samples=8, rows_per_part=250,
              progress=False)
    assert len(read(tmp_path / "out")) == 500


def test_truncated_file_is_an_error_naming_it(tiny_estimator, catalog, tmp_path):
    path, _ = catalog
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated.parquet"):
        infer(truncated, tiny_estimator, tmp_path / "out", request=["y"], num_samples=8, progress=False)


def test_resume_after_kill_minus_9_equals_an_uninterrupted_run(model_dir, catalog, tmp_path):
    path, _ = catalog
    out = tmp_path / "out"
    command = [sys.executable, "-m", "densiformer", "infer", str(path), "--model", str(model_dir),
               "--request", "y,z", "--num-samples", "400", "--batch-size", "25", "--seed", "3", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["done"]) >= 3:
            break
        time.sleep(0.005)
    assert job.poll() is None, "the run ended before it could be killed; make the job longer"
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = len(json.loads(manifest.read_text())["done"])
    assert 3 <= killed_at < 40
    subprocess.run(command + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(command[:-1] + [str(tmp_path / "clean")], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    resumed, clean = read(out), read(tmp_path / "clean")
    assert resumed.row.tolist() == list(range(1000))  # every row exactly once
    pd.testing.assert_frame_equal(resumed, clean)
    assert not list(out.glob(".*.tmp"))


def test_cli_infer_and_its_errors(model_dir, catalog, tmp_path, capsys):
    path, _ = catalog
    out = tmp_path / "out"
    assert main(["infer", str(path), "--model", str(model_dir), "--request", "z", "--num-samples", "8",
                 "--id-column", "source_id", "--columns", "a=a", "--out", str(out)]) == 0
    assert "1000 rows in" in capsys.readouterr().out
    assert read(out).columns[:2].tolist() == ["source_id", "unconditional"]
    assert main(["infer", str(path), "--model", str(model_dir), "--request", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["infer", str(path), "--model", str(model_dir), "--id-column", "missing",
                 "--out", str(tmp_path / "y")]) == 2
    assert "id column 'missing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["infer", str(path), "--model", str(model_dir), "--columns", "a:b", "--out", str(tmp_path / "z")])


def test_out_of_memory_halves_the_batch_and_loses_no_row(tiny_estimator, catalog, tmp_path, monkeypatch):
    import torch

    from densiformer.inference import predict

    path, _ = catalog
    infer(path, tiny_estimator, tmp_path / "ref", request=["y"], num_samples=16, rows_per_part=250, progress=False)
    real = tiny_estimator._sample_normalized
    batches = []

    def small_memory(*args, rows_per_batch=None, **kwargs):
        batches.append(rows_per_batch)
        if rows_per_batch > 32:  # a device that holds 32 rows at a time
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, rows_per_batch=rows_per_batch, **kwargs)

    monkeypatch.setattr(tiny_estimator, "_sample_normalized", small_memory)
    monkeypatch.setattr(predict, "_rows_per_batch", lambda num_samples: 256)
    infer(path, tiny_estimator, tmp_path / "out", request=["y"], num_samples=16, rows_per_part=250, progress=False)
    assert batches[:4] == [256, 128, 64, 32] and set(batches[4:]) == {32}  # halved once, then kept
    pd.testing.assert_frame_equal(read(tmp_path / "out"), read(tmp_path / "ref"))
