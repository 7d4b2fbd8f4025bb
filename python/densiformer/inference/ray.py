"""Catalog inference scaled out over a Ray cluster with Ray Data.

The Parquet catalog is cut into row ranges, the same ones the single-process runner
(inference/catalog.py) uses: each row group, in slices of at most `rows_per_batch`
rows. A Ray Dataset of these ranges goes through `map_batches` with a callable class,
so each actor loads the model once (one GPU per actor on GPU clusters), reads its
ranges with pyarrow and returns the output rows; `write_parquet` writes them.

Why ranges rather than `ray.data.read_parquet`: a row's samples are keyed by its
global row index, which is what makes the output equal the single-process output for
the same seed, and read_parquet's rows carry no position (only a path or a hash;
`Dataset.zip` with a range is deprecated since Ray 2.60). Ranges also keep every
row group read exactly once and let Ray retry a failed range on another actor.

Multi-node: start Ray on the nodes (`ray start --head` on one, `ray start
--address=HEAD:6379` on the others), put the catalog and the model where every node
can read them (shared or object storage), then run
`densiformer infer CATALOG --model DIR --out OUT --ray --ray-address HEAD:6379`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..data.readers import _parquet_files, file_columns
from ..estimator import DensityEstimator
from .catalog import InferenceResult, auto_rows_per_part, check_catalog_columns
from .predict import ChunkPredictor, InferenceOptions, read_columns, validate_options


def parquet_ranges(catalog, rows_per_batch: int) -> list[dict]:
    """[{file, row_group, offset, rows, start}]: slices of row groups, in catalog order."""
    import pyarrow.parquet as pq

    ranges, start = [], 0
    for file in _parquet_files(Path(catalog)):
        metadata = pq.read_metadata(file)
        for group in range(metadata.num_row_groups):
            group_rows = metadata.row_group(group).num_rows
            for offset in range(0, group_rows, rows_per_batch):
                rows = min(rows_per_batch, group_rows - offset)
                ranges.append({"file": str(file), "row_group": group, "offset": offset, "rows": rows,
                               "start": start + offset})
            start += group_rows
    return ranges


class _RangePredictor:
    """A Ray actor's model: reads row ranges and returns their output rows."""

    def __init__(self, model_dir: str, options: dict, backend: str, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.predictor = ChunkPredictor(DensityEstimator.load(model_dir, device=device),
                                        InferenceOptions(**options), backend)
        self.columns = None
        self._group = (None, None, None)  # (file, row group, table): consecutive slices share a read

    def _read(self, file, group):
        import pyarrow.parquet as pq

        if self._group[:2] != (file, group):
            parquet = pq.ParquetFile(file)
            wanted = [c for c in read_columns(self.predictor.est, self.predictor.options)
                      if c in parquet.schema_arrow.names]
            self._group = (file, group, parquet.read_row_group(group, columns=wanted))
        return self._group[2]

    def __call__(self, batch):
        import pyarrow as pa

        tables = []
        for i in range(batch.num_rows):
            task = {name: batch.column(name)[i].as_py() for name in batch.column_names}
            table = self._read(task["file"], task["row_group"]).slice(task["offset"], task["rows"])
            try:
                tables.append(self.predictor(table, task["start"]))
            except ValueError as err:
                stop = task["start"] + task["rows"]
                raise ValueError(f"{task['file']}, rows {task['start']}-{stop}: {err}") from err
        return pa.concat_tables(tables)


def _connect(address):
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a local cluster on this machine
            ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def infer_ray(catalog, model, out, request=None, num_samples: int = 100, *, seed: int = 0,
              id_column: str | None = None, columns: dict | None = None, sampler: str | None = None,
              steps: int | None = None, backend: str = "auto", samples: bool = False, log_prob_of=None,
              address: str | None = None, rows_per_batch: int | None = None, num_actors: int | None = None,
              device: str = "auto") -> InferenceResult:
    """`inference.infer` on a Ray cluster: the same output rows for the same seed.

    catalog: a Parquet file or directory every node can read. model: a model directory
    every node can read. address: an existing cluster (None: RAY_ADDRESS, or start a
    local one). num_actors: model replicas (default: one per GPU on a GPU cluster,
    else one per CPU but one, which Ray Data keeps for reading and writing).
    """
    started = time.perf_counter()
    if isinstance(model, DensityEstimator):
        raise TypeError("infer_ray loads the model on every actor: pass the model directory (est.save(dir))")
    if not (Path(catalog).is_dir() or str(catalog).lower().endswith((".parquet", ".pq"))):
        raise ValueError(f"{catalog}: --ray reads Parquet (a file or a directory of parts); convert it first "
                         "or run without --ray")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another output")
    est = DensityEstimator.load(model, device="cpu")  # validates the model and options on the driver
    options = InferenceOptions(request=est._request(request), num_samples=num_samples, seed=seed,
                               sampler=sampler, steps=steps, id_column=id_column, columns=dict(columns or {}),
                               samples=samples, log_prob_of=list(log_prob_of or []))
    validate_options(est, options)
    check_catalog_columns(catalog, file_columns(catalog), est, options)
    rows_per_batch = rows_per_batch or auto_rows_per_part(num_samples, len(options.request), samples)
    ranges = parquet_ranges(catalog, rows_per_batch)

    ray = _connect(address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device in ("auto", "cuda") else 0
    if device == "cuda" and not gpus:
        raise RuntimeError("device='cuda' but the Ray cluster has no GPUs")
    if gpus:
        actors, per_actor = num_actors or gpus, {"num_gpus": 1}
        threads, actor_device = 1, "cuda"
    else:
        cpus = int(resources.get("CPU", 1))
        actors = num_actors or max(1, cpus - 1)
        threads = max(1, (cpus - 1) // actors) if cpus > 1 else 1
        per_actor, actor_device = {"num_cpus": threads}, "cpu"
    tasks = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))
    results = tasks.map_batches(
        _RangePredictor, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs={"model_dir": str(Path(model).resolve()), "options": options.to_dict(),
                               "backend": backend, "device": actor_device, "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=actors), **per_actor)
    results.write_parquet(str(out))
    rows = sum(r["rows"] for r in ranges)
    return InferenceResult(out, rows, rows, len(ranges), time.perf_counter() - started)
