"""Catalog files as a stream of pyarrow Tables of at most `chunk_rows` rows.

Formats: Parquet (one file or a directory of parts), CSV, FITS binary tables and
HDF5. Files are read in row slices and never loaded whole, so catalogs larger than
memory stream through. In-memory tables (pandas, pyarrow, dict of arrays) go through
the same interface, so callers have one code path.

When `columns` is given, only those present in the file are read; an absent one is
simply not in the chunk, and the caller treats it as not observed.
"""
from __future__ import annotations

import errno
import importlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .tables import ACCEPTED, as_column_dict

# Longest suffix first, so that "x.fits.gz" is not taken for something else.
_SUFFIXES = {
    ".fits.gz": "fits", ".fit.gz": "fits", ".csv.gz": "csv",
    ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
    ".fits": "fits", ".fit": "fits", ".h5": "hdf5", ".hdf5": "hdf5",
}
SUPPORTED = ("Parquet (.parquet, .pq, or a directory of Parquet parts), CSV (.csv, .csv.gz), "
             "FITS binary table (.fits, .fit, .fits.gz, .fit.gz), HDF5 (.h5, .hdf5)")

# What the underlying libraries raise for a corrupt or truncated file.
_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, pa.ArrowException)


def iter_chunks(source, columns=None, chunk_rows=65536) -> Iterator[pa.Table]:
    """Yield `source` as pyarrow Tables of at most `chunk_rows` rows, in file order.

    `source`: a path (see SUPPORTED) or an in-memory table. `columns`: names to read
    (those absent from the file are skipped); None reads every column.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if isinstance(source, (str, os.PathLike)):
        path = _existing(source)
        chunks = _FORMATS[_format(path)].chunks(path, columns, chunk_rows)
    else:
        chunks = _memory_chunks(source, columns, chunk_rows)
    for chunk in chunks:
        table = pa.Table.from_batches([chunk]) if isinstance(chunk, pa.RecordBatch) else chunk
        # Readers that work in blocks (CSV) can return more rows than asked for.
        for start in range(0, table.num_rows, chunk_rows):
            # Explicit length: a table without columns does not clip it to its rows.
            yield table.slice(start, min(chunk_rows, table.num_rows - start))


def num_rows(source) -> int:
    """Row count, from metadata where the format has it (CSV is scanned)."""
    if isinstance(source, (str, os.PathLike)):
        path = _existing(source)
        return _FORMATS[_format(path)].rows(path)
    return len(source) if isinstance(source, pd.DataFrame) else _memory_table(source).num_rows


def file_columns(source) -> list[str]:
    """Column names, in file order (the union over the parts of a Parquet directory)."""
    if isinstance(source, (str, os.PathLike)):
        path = _existing(source)
        return _FORMATS[_format(path)].columns(path)
    if isinstance(source, pd.DataFrame):
        return [str(c) for c in source.columns]
    return list(_memory_table(source).schema.names)


def _existing(source) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", str(path))
    return path


def _format(path: Path) -> str:
    if path.is_dir():
        return "parquet"
    name = path.name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unknown file type; supported: {SUPPORTED}")


@contextmanager
def _reading(path, rows=""):
    """Re-raise a library's error on a bad file as ValueError naming the file and rows."""
    try:
        yield
    except _READ_ERRORS as err:
        where = f" ({rows})" if rows else ""
        raise ValueError(f"cannot read {path}{where}: {type(err).__name__}: {err}") from err


def _guarded(path, batches, start=0):
    """Yield from `batches`, naming the file and first row of a batch that fails to read."""
    while True:
        with _reading(path, f"rows from {start}"):
            batch = next(batches, None)
        if batch is None:
            return
        start += batch.num_rows
        yield batch


def _wanted(names, columns) -> list[str]:
    return list(names) if columns is None else [c for c in columns if c in names]


def _no_columns(n_rows) -> pa.Table:
    """A table with rows but no columns: none of the requested columns is in the file."""
    return pa.table({"": pa.nulls(n_rows)}).select([])


def _arrow(values: np.ndarray, null=None) -> pa.Array:
    """A column read from FITS or HDF5 as an Arrow array, null where it equals `null`."""
    values = np.asarray(values)  # astropy gives string columns as chararray
    if values.dtype.byteorder not in "=|":  # FITS is big-endian; Arrow wants native
        values = values.astype(values.dtype.newbyteorder("="))
    if values.dtype.kind == "S":
        values = values.astype(str)
    if values.ndim == 2:  # a vector per row
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.array(values, mask=None if null is None else values == null)


# ---- in memory ------------------------------------------------------------------

def _memory_table(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, dict):
        return pa.table(as_column_dict(data))
    raise TypeError(f"expected a file path or {ACCEPTED}; got {type(data).__name__}")


def _memory_chunks(data, columns, chunk_rows):
    if isinstance(data, pd.DataFrame):  # converted slice by slice, not all at once
        data = data[_wanted(data.columns, columns)]
        for start in range(0, len(data), chunk_rows):
            piece = data.iloc[start:start + chunk_rows]
            table = pa.Table.from_pandas(piece, preserve_index=False)
            yield table if table.num_columns else _no_columns(len(piece))
        return
    table = _memory_table(data)
    yield table.select(_wanted(table.schema.names, columns))


# ---- Parquet ------------------------------------------------------------------

def _parquet_files(path: Path) -> list[str]:
    if not path.is_dir():
        return [str(path)]
    with _reading(path):
        files = sorted(pads.dataset(path, format="parquet").files)
    if not files:
        raise ValueError(f"{path}: directory holds no Parquet files")
    return files


def _parquet_columns(path):
    names = {}  # dict as an ordered set
    for file in _parquet_files(path):
        with _reading(file):
            names.update(dict.fromkeys(pq.read_schema(file).names))
    return list(names)


def _parquet_rows(path):
    total = 0
    for file in _parquet_files(path):
        with _reading(file):
            total += pq.read_metadata(file).num_rows
    return total


def _parquet_chunks(path, columns, chunk_rows):
    for file in _parquet_files(path):
        with _reading(file):
            parquet = pq.ParquetFile(file)
            wanted = _wanted(parquet.schema_arrow.names, columns)
        start = 0
        # Row group by row group, so that an error names the rows it was reading.
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(
                batch_size=chunk_rows, row_groups=[group], columns=wanted)
            yield from _guarded(file, batches, start)
            start += parquet.metadata.row_group(group).num_rows


# ---- CSV ----------------------------------------------------------------------

def _csv_reader(path, columns=None, chunk_rows=65536):
    """Streaming reader whose blocks hold about `chunk_rows` rows."""
    with _reading(path):
        with pa.input_stream(str(path)) as stream:  # decompresses .gz
            sample = stream.read(1 << 20)
        row_bytes = len(sample) / max(1, sample.count(b"\n"))
        block_size = int(min(max(row_bytes * chunk_rows * 1.5, 1 << 20), 1 << 30))
        options = pacsv.ReadOptions(block_size=block_size)
        schema = pacsv.open_csv(path, read_options=options).schema
        # An empty include_columns means all of them, so with none of the requested
        # columns present, read the first one only (for the row counts).
        wanted = _wanted(schema.names, columns) or schema.names[:1]
        # A column empty in the first block is typed null and would fail on the first
        # value further down; catalog columns are numbers, so read it as float64.
        convert = pacsv.ConvertOptions(
            include_columns=wanted,
            column_types={f.name: pa.float64() for f in schema if pa.types.is_null(f.type)})
        return pacsv.open_csv(path, read_options=options, convert_options=convert)


def _csv_columns(path):
    return list(_csv_reader(path).schema.names)


def _csv_rows(path):
    return sum(batch.num_rows for batch in _csv_chunks(path, [], 65536))


def _csv_chunks(path, columns, chunk_rows):
    reader = _csv_reader(path, columns, chunk_rows)
    wanted = _wanted(reader.schema.names, columns)
    for batch in _guarded(path, iter(reader)):
        yield batch.select(wanted)


# ---- FITS ---------------------------------------------------------------------

@contextmanager
def _fits_table(path):
    """The first table HDU of a FITS file, memory-mapped (astropy decompresses a .gz whole)."""
    fits = _optional("astropy.io.fits", "FITS")
    with _reading(path):
        hdus = fits.open(path, memmap=True)
    with hdus:
        tables = [h for h in hdus if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
        if not tables:
            raise ValueError(f"{path}: no table extension among its {len(hdus)} HDUs")
        yield tables[0]


def _fits_columns(path):
    with _fits_table(path) as hdu:
        return list(hdu.columns.names)


def _fits_rows(path):
    with _fits_table(path) as hdu:
        return int(hdu.header["NAXIS2"])


def _fits_chunks(path, columns, chunk_rows):
    with _fits_table(path) as hdu:
        wanted = _wanted(hdu.columns.names, columns)
        n_rows = int(hdu.header["NAXIS2"])
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            with _reading(path, f"rows {start}-{stop - 1}"):
                rows = hdu.data[start:stop]  # a view of the memory map: reads these rows only
                table = pa.table({name: _arrow(rows.field(name), _fits_null(hdu.columns[name]))
                                  for name in wanted}) if wanted else _no_columns(stop - start)
            yield table


def _fits_null(column):
    """The integer that marks an absent value (TNULL), where it applies to what astropy
    returns: integer columns stored without scaling (TNULL is in stored units)."""
    scaled = column.bzero not in (None, 0) or column.bscale not in (None, 1)
    integer = isinstance(column.null, (int, np.integer)) and not isinstance(column.null, bool)
    return column.null if integer and not scaled else None


# ---- HDF5 ---------------------------------------------------------------------

@contextmanager
def _hdf5_table(path):
    """(columns, n_rows, read) of an HDF5 file; read(names, start, stop) -> {name: array}.

    Layouts: a group of equal-length 1-D datasets, one per column, or a single
    compound (structured) dataset. The file's root is searched, descending while
    it holds a single group (as pandas' HDFStore writes).
    """
    h5py = _optional("h5py", "HDF5")
    with _reading(path):
        file = h5py.File(path, "r")
    with file:
        group = file
        while len(group) == 1 and isinstance(next(iter(group.values())), h5py.Group):
            group = next(iter(group.values()))
        datasets = {name: m for name, m in group.items() if isinstance(m, h5py.Dataset)}
        compound = [d for d in datasets.values() if d.dtype.names]
        plain = {name: d for name, d in datasets.items() if d.ndim == 1 and not d.dtype.names}
        if len(compound) == 1 and not plain:
            table = compound[0]

            def read(names, start, stop):
                rows = table.fields(names)[start:stop]  # reads only these fields
                return {name: rows[name] for name in names}

            yield list(table.dtype.names), len(table), read
        elif plain and not compound:
            lengths = {name: len(d) for name, d in plain.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(
                    f"{path}: the 1-D datasets in {group.name} differ in length: {lengths}")

            def read(names, start, stop):
                return {name: plain[name][start:stop] for name in names}

            yield list(plain), next(iter(lengths.values())), read
        else:
            raise ValueError(
                f"{path}: expected in {group.name} either 1-D datasets of equal length (one per "
                f"column) or a single compound dataset; found {list(group)}")


def _hdf5_columns(path):
    with _hdf5_table(path) as (names, _, _):
        return names


def _hdf5_rows(path):
    with _hdf5_table(path) as (_, n_rows, _):
        return n_rows


def _hdf5_chunks(path, columns, chunk_rows):
    with _hdf5_table(path) as (names, n_rows, read):
        wanted = _wanted(names, columns)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            with _reading(path, f"rows {start}-{stop - 1}"):
                values = read(wanted, start, stop)
                table = pa.table({name: _arrow(values[name]) for name in wanted}) \
                    if wanted else _no_columns(stop - start)
            yield table


def _optional(module, what):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"reading {what} files needs {module.split('.')[0]}, which is not "
                          "installed: pip install 'densiformer[io]'") from err


class _Format(NamedTuple):
    columns: Callable
    rows: Callable
    chunks: Callable


_FORMATS = {
    "parquet": _Format(_parquet_columns, _parquet_rows, _parquet_chunks),
    "csv": _Format(_csv_columns, _csv_rows, _csv_chunks),
    "fits": _Format(_fits_columns, _fits_rows, _fits_chunks),
    "hdf5": _Format(_hdf5_columns, _hdf5_rows, _hdf5_chunks),
}
