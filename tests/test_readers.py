"""Chunked readers: every format reads back the table it was written from, in bounded chunks."""
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from densiformer.data.readers import file_columns, iter_chunks, num_rows

N, CHUNK = 1000, 77


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    plx = rng.normal(5, 2, N)
    plx[::10] = np.nan
    return pd.DataFrame({"source_id": np.arange(N, dtype=np.int64) * 1_000_003,
                         "plx": plx, "hpmag": rng.normal(9, 1, N).astype(np.float32)})


def _read(source, columns=None, chunk_rows=CHUNK):
    chunks = list(iter_chunks(source, columns=columns, chunk_rows=chunk_rows))
    assert all(0 < c.num_rows <= chunk_rows for c in chunks)
    return chunks, pa.concat_tables(chunks).to_pandas()


def _check(source, frame, exact_types=True):
    _, back = _read(source)
    assert num_rows(source) == N
    assert file_columns(source) == list(frame.columns)
    pd.testing.assert_frame_equal(back, frame, check_dtype=exact_types)
    # Only the requested columns that exist are read.
    _, back = _read(source, columns=["hpmag", "not_in_file", "plx"])
    assert list(back.columns) == ["hpmag", "plx"]
    pd.testing.assert_frame_equal(back, frame[["hpmag", "plx"]], check_dtype=exact_types)


def test_parquet_file(tmp_path, frame):
    path = tmp_path / "catalog.parquet"
    frame.to_parquet(path, row_group_size=300)
    _check(path, frame)
    _check(str(path), frame)


def test_parquet_directory(tmp_path, frame):
    parts = tmp_path / "catalog"
    parts.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(N), 3)):
        frame.iloc[rows].to_parquet(parts / f"part-{i}.parquet")
    _, back = _read(parts)
    assert num_rows(parts) == N and file_columns(parts) == list(frame.columns)
    pd.testing.assert_frame_equal(back, frame)


def test_csv(tmp_path, frame):
    path = tmp_path / "catalog.csv"
    pacsv.write_csv(pa.Table.from_pandas(frame), path)
    _check(path, frame.astype({"hpmag": np.float64}))


def test_no_requested_column_in_file_still_gives_rows(tmp_path, frame):
    path = tmp_path / "catalog.csv"
    frame.to_csv(path, index=False)
    chunks, _ = _read(path, columns=["nothing"])
    assert sum(c.num_rows for c in chunks) == N and all(c.num_columns == 0 for c in chunks)


def test_in_memory(frame):
    for source in (frame, pa.Table.from_pandas(frame), {c: frame[c].to_numpy() for c in frame}):
        _check(source, frame)


def test_fits(tmp_path, frame):
    table = pytest.importorskip("astropy.table")
    for name in ("catalog.fits", "catalog.fits.gz"):
        path = tmp_path / name
        table.Table.from_pandas(frame).write(path)  # big-endian on disk
        _check(path, frame)


def test_fits_null_integers(tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    column = fits.Column(name="n", format="J", null=-1, array=np.array([1, -1, 3]))
    path = tmp_path / "nulls.fits"
    fits.BinTableHDU.from_columns([column]).writeto(path)
    (chunk,) = iter_chunks(path)
    assert chunk.column("n").to_pylist() == [1, None, 3]


def test_hdf5_column_datasets(tmp_path, frame):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "catalog.h5"
    with h5py.File(path, "w") as f:
        for name in frame:
            f[name] = frame[name].to_numpy()
    _check(path, frame.sort_index(axis=1))  # h5py lists members by name


def test_hdf5_compound_dataset(tmp_path, frame):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "catalog.hdf5"
    with h5py.File(path, "w") as f:
        records = frame.to_records(index=False)
        f["stars"] = records.astype(records.dtype.newbyteorder(">"))  # not native order
    _check(path, frame)


def test_hdf5_unequal_lengths(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["a"], f["b"] = np.zeros(3), np.zeros(4)
    with pytest.raises(ValueError, match="'a': 3.*'b': 4"):
        list(iter_chunks(path))


def test_truncated_parquet_names_the_file(tmp_path, frame):
    path = tmp_path / "truncated.parquet"
    frame.to_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.parquet"):
        list(iter_chunks(path))
    with pytest.raises(ValueError, match="truncated.parquet"):
        num_rows(path)


def test_corrupt_parquet_page_names_the_rows(tmp_path, frame):
    path = tmp_path / "corrupt.parquet"
    frame.to_parquet(path, row_group_size=300, compression="snappy")
    metadata = pq.read_metadata(path)
    column = metadata.row_group(1).column(1)  # plx of rows 300-599
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt.parquet \(rows from 300\)"):
        list(iter_chunks(path))


def test_garbage_fits_names_the_file(tmp_path):
    pytest.importorskip("astropy")
    path = tmp_path / "garbage.fits"
    path.write_bytes(b"not a FITS file at all " * 200)
    with pytest.raises(ValueError, match="garbage.fits"):
        list(iter_chunks(path))


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_truncated_fits_names_the_rows(tmp_path, frame):
    table = pytest.importorskip("astropy.table")
    path = tmp_path / "truncated.fits"
    table.Table.from_pandas(frame).write(path)
    path.write_bytes(path.read_bytes()[:-2 * 2880])
    with pytest.raises(ValueError, match=r"truncated.fits \(rows \d+-\d+\)"):
        list(iter_chunks(path))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        list(iter_chunks(tmp_path / "nowhere.parquet"))
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        num_rows(tmp_path / "nowhere.csv")
    path = tmp_path / "catalog.xlsx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="Parquet.*CSV.*FITS.*HDF5"):
        list(iter_chunks(path))


def test_missing_optional_dependency_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "catalog.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match=r"pip install 'densiformer\[io\]'"):
        list(iter_chunks(path))
