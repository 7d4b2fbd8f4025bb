"""In-memory tables to a float matrix: every error names the column and the row count."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from densiformer.data.tables import as_column_dict, to_matrix

COLUMNS = ["plx", "hpmag", "b_v"]
N = 50


def _frame(**overrides):
    rng = np.random.default_rng(0)
    data = {name: rng.normal(size=N) for name in COLUMNS}
    data.update(overrides)
    return pd.DataFrame(data)


@pytest.mark.parametrize("bad, words", [
    (np.r_[np.inf, np.zeros(N - 1)], ["1 infinite"]),
    (np.r_[np.zeros(N - 3), -np.inf, -np.inf, np.inf], ["3 infinite"]),
    (np.array(["a"] * N), ["not numeric"]),
    (np.array([1.0] * (N - 1) + ["x"], dtype=object), ["not numeric", "object"]),
    (np.zeros(N, dtype=bool), ["not numeric", "bool"]),
    (pd.date_range("2020-01-01", periods=N).to_numpy(), ["not numeric", "datetime64"]),
])
def test_bad_column_names_column_and_row_count(bad, words):
    with pytest.raises(ValueError) as info:
        to_matrix(_frame(plx=bad), COLUMNS, what="inputs")
    message = str(info.value)
    assert message.startswith("inputs: ")
    assert "'plx'" in message and str(N) in message
    for word in words:
        assert word in message


def test_unknown_columns_are_all_named():
    data = _frame(extra_a=np.zeros(N), extra_b=np.zeros(N))
    with pytest.raises(ValueError) as info:
        to_matrix(data, COLUMNS, what="targets")
    message = str(info.value)
    assert message.startswith("targets: ")
    assert "extra_a" in message and "extra_b" in message and str(N) in message
    assert all(name in message for name in COLUMNS)  # lists the known columns


def test_allow_extra_ignores_unknown_columns():
    data = _frame(extra=np.array(["text"] * N))
    out = to_matrix(data, COLUMNS, allow_extra=True)
    np.testing.assert_array_equal(out, to_matrix(_frame(), COLUMNS))


def test_required_column_absent():
    with pytest.raises(ValueError, match="'b_v'.*50 rows"):
        to_matrix(_frame().drop(columns="b_v"), COLUMNS, require=["b_v"])


def test_empty_table():
    with pytest.raises(ValueError) as info:
        to_matrix(_frame().iloc[:0], COLUMNS)
    assert "plx" in str(info.value) and "0 rows" in str(info.value)


def test_mismatched_dict_lengths():
    with pytest.raises(ValueError) as info:
        as_column_dict({"plx": np.zeros(3), "hpmag": np.zeros(4)})
    message = str(info.value)
    assert "'plx': 3" in message and "'hpmag': 4" in message
    with pytest.raises(ValueError, match="'plx': 3"):
        to_matrix({"plx": np.zeros(3), "hpmag": np.zeros(4)}, COLUMNS)


def test_unsupported_type_says_what_is_accepted():
    with pytest.raises(TypeError, match="DataFrame.*iter_chunks"):
        to_matrix("catalog.parquet", COLUMNS)


def test_overflow_of_float32_is_an_error():
    with pytest.raises(ValueError, match="'hpmag'.*range of float32"):
        to_matrix(_frame(hpmag=np.full(N, 1e300)), COLUMNS)
    assert to_matrix(_frame(hpmag=np.full(N, 1e300)), COLUMNS, dtype=np.float64)[0, 1] == 1e300


def test_nan_passes_and_absent_column_is_nan():
    plx = np.r_[np.nan, np.ones(N - 1)]
    out = to_matrix(_frame(plx=plx).drop(columns="b_v"), COLUMNS)
    assert out.shape == (N, 3) and out.dtype == np.float32
    assert np.isnan(out[0, 0]) and not np.isnan(out[1:, 0]).any()
    assert np.isnan(out[:, 2]).all()
    assert not np.isnan(out[:, 1]).any()


def test_dataframe_arrow_and_dict_agree():
    frame = _frame(hpmag=np.arange(N))  # an integer column is fine
    expected = np.stack([frame[c].to_numpy() for c in COLUMNS], axis=1).astype(np.float32)
    inputs = [frame, pa.Table.from_pandas(frame), pa.RecordBatch.from_pandas(frame),
              {c: frame[c].to_numpy() for c in COLUMNS},
              {c: frame[c].tolist() for c in COLUMNS}]
    for data in inputs:
        np.testing.assert_array_equal(to_matrix(data, COLUMNS), expected)
    # Larger than a fill block, with columns in another order than the data.
    rng = np.random.default_rng(1)
    big = {c: rng.normal(size=20_000) for c in COLUMNS}
    out = to_matrix(big, COLUMNS[::-1], dtype=np.float64)
    np.testing.assert_array_equal(out, np.stack([big[c] for c in COLUMNS[::-1]], axis=1))


def test_nullable_and_null_values_become_nan():
    expected = np.array([[1, 0.5], [np.nan, np.nan], [3, 2.5]], dtype=np.float32)
    frame = pd.DataFrame({"plx": pd.array([1, None, 3], dtype="Int64"),
                          "hpmag": pd.array([0.5, None, 2.5], dtype="Float64")})
    table = pa.table({"plx": pa.array([1, None, 3]), "hpmag": pa.array([0.5, None, 2.5])})
    objects = {"plx": np.array([1, None, 3], dtype=object), "hpmag": [0.5, None, 2.5]}
    for data in (frame, table, objects):
        np.testing.assert_array_equal(to_matrix(data, COLUMNS)[:, :2], expected)


def test_nullable_bool_and_arrow_strings_are_rejected():
    with pytest.raises(ValueError, match="'plx'.*3 rows"):
        to_matrix(pd.DataFrame({"plx": pd.array([True, None, False], dtype="boolean")}), COLUMNS)
    with pytest.raises(ValueError, match="'plx'.*3 rows"):
        to_matrix(pa.table({"plx": ["1", "2", None]}), COLUMNS)


def test_as_column_dict_does_not_copy_numeric_columns():
    values = np.arange(10.0)
    assert np.shares_memory(as_column_dict({"a": values})["a"], values)
    assert np.shares_memory(as_column_dict(pd.DataFrame({"a": values}, copy=False))["a"], values)
    assert np.shares_memory(as_column_dict(pa.table({"a": values}))["a"], values)
