"""In-memory tables (pandas, pyarrow, dict of arrays) to a validated float matrix.

NaN means "not observed" everywhere in densiformer, so missing values of any kind
(pandas NA, pyarrow nulls, None in an object column) become NaN here, and an absent
column is an all-NaN column. Everything else that is not a finite number is an error
raised before any matrix is returned: a silent inf or a string column cast to garbage
would poison training without any sign of it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

ACCEPTED = "a pandas DataFrame, a pyarrow Table or RecordBatch, or a dict of 1-D arrays"

# pandas.api.types.infer_dtype results for object columns that hold only numbers
# (NA-like values are skipped); anything else (strings, bools, dates, ...) is rejected.
_NUMERIC_OBJECTS = {"floating", "integer", "mixed-integer-float", "decimal", "empty"}
_BLOCK_ROWS = 8192


def as_column_dict(data) -> dict[str, np.ndarray]:
    """Columns of `data` as 1-D numpy arrays, keyed by name (no copy where possible).

    Nullable numeric columns (pandas Int64/Float64, pyarrow numbers with nulls) come
    back as float64 with NaN for missing values; other columns keep their dtype.
    """
    return _columns_and_rows(data, "data")[0]


def to_matrix(data, columns, *, allow_extra=False, require=(), dtype=np.float32,
              what="inputs") -> np.ndarray:
    """(n_rows, len(columns)) matrix of `data`, in the order of `columns`.

    A name of `columns` absent from `data` gives an all-NaN column (not observed).
    Names in `data` that are not in `columns` raise ValueError unless `allow_extra`;
    names in `require` must be present. Values must be numeric (bool is not) and
    not infinite; NaN is a missing value. Error messages start with `what`.
    """
    cols, n_rows = _columns_and_rows(data, what)
    columns = list(columns)
    known = set(columns)
    table = f"(table of {n_rows} rows)"

    unknown = [name for name in cols if name not in known]
    if unknown and not allow_extra:
        raise ValueError(f"{what}: unknown column(s) {unknown} {table}; known columns: {columns}")
    missing = [name for name in require if name not in cols]
    if missing:
        raise ValueError(f"{what}: required column(s) {missing} are absent {table}; "
                         f"present: {list(cols)}")
    if n_rows == 0:
        raise ValueError(f"{what}: the table is empty (0 rows); columns: {list(cols)}")

    present = [(j, name, _numeric(name, cols[name], n_rows, what))
               for j, name in enumerate(columns) if name in cols]
    out = np.empty((n_rows, len(columns)), dtype=dtype)
    out[:, [j for j, name in enumerate(columns) if name not in cols]] = np.nan
    # Filled in row blocks that stay in cache (whole strided columns are ~2.5x slower),
    # where checking for inf (from the data, or from overflow of the dtype) is cheap.
    infinite = False
    with np.errstate(over="ignore"):  # overflow is reported below, as an error
        for start in range(0, n_rows, _BLOCK_ROWS):
            block = out[start:start + _BLOCK_ROWS]
            for j, _, values in present:
                block[:, j] = values[start:start + _BLOCK_ROWS]
            infinite = infinite or bool(np.isinf(block).any())
    if infinite:
        raise _infinite_error(present, out, n_rows, what)
    return out


def _infinite_error(present, out, n_rows, what) -> ValueError:
    problems = []
    for j, name, values in present:
        count = np.count_nonzero(np.isinf(values))
        if count:
            problems.append(f"column {name!r} has {count} infinite values")
        elif np.isinf(out[:, j]).any():
            problems.append(f"column {name!r} has values beyond the range of {out.dtype}")
    return ValueError(f"{what}: {', '.join(problems)} (of {n_rows} rows); "
                      "use NaN for a missing value")


def _columns_and_rows(data, what) -> tuple[dict[str, np.ndarray], int]:
    """Columns as 1-D arrays and the row count (which a table with no columns still has)."""
    if isinstance(data, pd.DataFrame):
        names = [str(c) for c in data.columns]
        arrays = [_pandas_to_numpy(data.iloc[:, i]) for i in range(data.shape[1])]
        n_rows = len(data)
    elif isinstance(data, (pa.Table, pa.RecordBatch)):
        names = list(data.schema.names)
        arrays = [col.to_numpy(zero_copy_only=False) for col in data.columns]
        n_rows = data.num_rows
    elif isinstance(data, dict):
        names = [str(c) for c in data]
        arrays = [_any_to_numpy(v) for v in data.values()]
        bad = {name: a.shape for name, a in zip(names, arrays) if a.ndim != 1}
        if bad:
            raise ValueError(f"{what}: columns must be 1-D; got shapes {bad}")
        lengths = {name: len(a) for name, a in zip(names, arrays)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{what}: columns have different lengths {lengths}")
        n_rows = next(iter(lengths.values()), 0)
    else:
        raise TypeError(f"{what}: expected {ACCEPTED}; got {type(data).__name__}. "
                        "To read a file (Parquet, CSV, FITS, HDF5), use "
                        "densiformer.data.readers.iter_chunks.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what}: duplicate column name(s) {duplicates} (table of {n_rows} rows)")
    return dict(zip(names, arrays)), n_rows


def _pandas_to_numpy(series: pd.Series) -> np.ndarray:
    dtype = series.dtype
    if (isinstance(dtype, pd.api.extensions.ExtensionDtype)
            and pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return series.to_numpy()


def _any_to_numpy(values) -> np.ndarray:
    if isinstance(values, pd.Series):
        return _pandas_to_numpy(values)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def _numeric(name, values, n_rows, what) -> np.ndarray:
    """`values` if numeric; an object column of numbers and NA-likes as float64."""
    kind = values.dtype.kind
    if kind in "iuf":
        return values
    if kind == "O":
        held = pd.api.types.infer_dtype(values, skipna=True)
        if held in _NUMERIC_OBJECTS:
            return _as_float(values)
        detail = f"dtype object holding {held} values"
    elif kind == "b":
        detail = "dtype bool (cast it to int or float if it is meant as a number)"
    else:
        detail = f"dtype {values.dtype}"
    raise ValueError(f"{what}: column {name!r} is not numeric ({detail}; table of {n_rows} rows)")


def _as_float(values: np.ndarray) -> np.ndarray:
    """Object column of numbers and NA-likes (None, NaN, pd.NA) to float64 with NaN."""
    missing = pd.isna(values)
    out = np.full(values.shape, np.nan)
    out[~missing] = values[~missing].astype(np.float64)
    return out
