"""One chunk of a catalog in, one table of posterior summaries out.

`ChunkPredictor` is what both the single-process runner (inference/catalog.py) and the
Ray Data actors (inference/ray.py) call, so the two give identical rows. A row's
samples depend only on (seed, its global row index), never on how rows are chunked or
batched (see DensityEstimator._sample_normalized), which is what makes a resumed run,
a run with another batch size and a Ray run equal to an uninterrupted one.

Output columns, in order: the row id (`row`, the global row index, or the input's id
column), `unconditional` (True where the row has no observed input, so its summaries
are of the unconditional density), the `summarize` columns of each requested name,
`<name>_samples` (fixed-size lists) with `samples=True`, and `log_prob` (the joint log
density of the observed `log_prob_of` columns given the other inputs, NaN where one is
missing) when asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ..data.tables import to_matrix
from ..estimator import DensityEstimator, _rows_per_batch
from ..summary import summarize_samples

ROW_COLUMN = "row"
UNCONDITIONAL_COLUMN = "unconditional"
LOG_PROB_COLUMN = "log_prob"


@dataclass
class InferenceOptions:
    """Everything that decides the output rows; stored in a resumable run's manifest."""

    request: list[str]
    num_samples: int = 100
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    id_column: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # model name -> name in the catalog
    samples: bool = False
    log_prob_of: list[str] = field(default_factory=list)

    def file_name(self, model_name: str) -> str:
        return self.columns.get(model_name, model_name)

    def to_dict(self) -> dict:
        return {"request": list(self.request), "num_samples": self.num_samples, "seed": self.seed,
                "sampler": self.sampler, "steps": self.steps, "id_column": self.id_column,
                "columns": dict(self.columns), "samples": self.samples, "log_prob_of": list(self.log_prob_of)}


def validate_options(est: DensityEstimator, options: InferenceOptions) -> None:
    """ValueError naming what is wrong, before any catalog row is read."""
    est._request(options.request)
    if options.num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {options.num_samples}")
    if not (isinstance(options.seed, (int, np.integer)) and 0 <= options.seed < 1 << 63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {options.seed!r}")
    unknown = sorted(set(options.columns) - set(est.all_columns))
    if unknown:
        raise ValueError(f"--columns maps {unknown}, which the model does not know; "
                         f"its columns are {list(est.all_columns)}")
    if options.log_prob_of:
        est._request(options.log_prob_of)


def read_columns(est: DensityEstimator, options: InferenceOptions) -> list[str]:
    """Catalog column names to read: the model's inputs, log_prob_of values and the id."""
    names = [options.file_name(c) for c in est.all_columns]
    if options.id_column and options.id_column not in names:
        names.append(options.id_column)
    return names


class ChunkPredictor:
    """Summaries (and samples, log densities) for chunks of catalog rows."""

    def __init__(self, est: DensityEstimator, options: InferenceOptions, backend: str = "auto",
                 rows_per_batch: int | None = None):
        validate_options(est, options)
        self.est, self.options, self.backend = est, options, backend
        self.request_idx = [est.targets.index(r) for r in options.request]
        # Inputs that still inform a row once the requested targets are removed from them.
        self.informative = [i for i, c in enumerate(est.all_columns) if c not in options.request]
        self.rows_per_batch = rows_per_batch or _rows_per_batch(options.num_samples)

    def inputs(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The model's columns of a catalog chunk, under the model's names."""
        present = set(table.column_names)
        return {c: table.column(self.options.file_name(c)) for c in self.est.all_columns
                if self.options.file_name(c) in present}

    def __call__(self, table: pa.Table, row_start: int) -> pa.Table:
        """Output rows for `table`, whose first row has global index `row_start`.

        Raises ValueError (naming the column) on a value that is not a number.
        """
        est, options = self.est, self.options
        n = table.num_rows
        columns = {c: v.to_numpy(zero_copy_only=False) for c, v in self.inputs(table).items()}
        # float64, as DensityEstimator.log_prob reads the values it evaluates.
        if columns and n:
            physical = to_matrix(columns, est.all_columns, dtype=np.float64)
        else:  # a chunk with none of the model's columns: nothing is observed
            physical = np.full((n, len(est.all_columns)), np.nan)
        # Inputs through float32, as DensityEstimator.sample reads them: the same draws.
        values = est.schema.normalize(physical.astype(np.float32), est.all_columns)
        unconditional = np.isnan(values[:, self.informative]).all(axis=1)
        z = self._sample(values, row_start)
        draws = est.schema.denormalize(z, options.request).astype(np.float32)
        out = summarize_samples(draws, options.request)
        if options.id_column:
            ids = table.column(options.id_column)
        else:
            ids = pa.array(np.arange(row_start, row_start + n, dtype=np.int64))
        out = out.add_column(0, options.id_column or ROW_COLUMN, ids)
        out = out.add_column(1, UNCONDITIONAL_COLUMN, pa.array(unconditional))
        if options.samples:
            for j, name in enumerate(options.request):
                flat = pa.array(np.ascontiguousarray(draws[..., j]).reshape(-1))
                out = out.append_column(f"{name}_samples",
                                        pa.FixedSizeListArray.from_arrays(flat, options.num_samples))
        if options.log_prob_of:
            out = out.append_column(LOG_PROB_COLUMN, pa.array(self._log_prob(physical), pa.float64()))
        return out

    def _sample(self, values: np.ndarray, row_start: int) -> np.ndarray:
        """Normalised samples; on a CUDA out-of-memory error, halve the batch and retry.

        Samples are keyed by global row, so a retry with smaller batches draws the same.
        """
        options = self.options
        while True:
            try:
                return self.est._sample_normalized(
                    values, self.request_idx, options.num_samples, options.sampler, options.steps,
                    self.backend, options.seed, False, row_offset=row_start, rows_per_batch=self.rows_per_batch)
            except torch.cuda.OutOfMemoryError:
                if self.rows_per_batch == 1:
                    raise
                self.rows_per_batch //= 2
                torch.cuda.empty_cache()

    def _log_prob(self, physical: np.ndarray) -> np.ndarray:
        est = self.est
        names = self.options.log_prob_of
        points = physical[:, [est.all_columns.index(c) for c in names]]
        # Every column conditions, the evaluated ones too: the model drops requested targets.
        inputs = dict(zip(est.all_columns, physical.T))
        return est.log_prob(points, inputs, request=names, progress=False)
