"""Streaming, resumable inference over a catalog too big for memory.

The output is a Parquet dataset (a directory). Each chunk of input rows becomes one
part file, `part-<first row>.parquet`, written under a hidden temporary name and then
renamed, so a part is either whole or absent. `_manifest.json` (rewritten the same
way after every part) holds the job's options and the finished input ranges. After a
crash or a kill -9, `resume=True` checks that the job is the same, skips the finished
ranges and computes the rest; because samples are keyed by (seed, global row), the
result equals an uninterrupted run. Readers skip names starting with "_" or ".", so
`pyarrow.parquet.read_table(out)` sees only finished parts.

Three threads overlap: one reads the next chunk, the caller's thread computes, and
one writes the previous part.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.readers import file_columns, iter_chunks, num_rows
from ..estimator import DensityEstimator
from .predict import ChunkPredictor, InferenceOptions, read_columns, validate_options

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = "densiformer-infer"
MANIFEST_VERSION = 1
MAX_ROWS_PER_PART = 1 << 16
MIN_ROWS_PER_PART = 1 << 8
# Keeps a part to about a minute of CPU work (seconds on a GPU): a crash loses little.
MAX_SAMPLES_PER_PART = 1 << 22


@dataclass
class InferenceResult:
    out: Path
    rows: int            # rows in the catalog (all of them are in `out` now)
    computed: int        # rows computed by this call (fewer when resuming)
    parts: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume a small machine
        return 4 << 30


def auto_rows_per_part(num_samples: int, k: int, samples: bool) -> int:
    """Rows per part, from free RAM: a part's draws and their summaries' temporaries
    (about six float32 copies of rows x num_samples x k, one more with samples) take
    at most 1/8 of the available memory, capped at 1 GiB, and a part holds at most
    MAX_SAMPLES_PER_PART samples. A power of two."""
    per_row = 4 * num_samples * k * (7 if samples else 6)
    budget = min(_available_ram() // 8, 1 << 30)
    rows = max(MIN_ROWS_PER_PART, min(MAX_ROWS_PER_PART, budget // per_row, MAX_SAMPLES_PER_PART // num_samples))
    return 1 << (int(rows).bit_length() - 1)


def auto_rows_per_batch(est: DensityEstimator, num_samples: int) -> int | None:
    """Rows the head evaluates at once. On a GPU, as many as a quarter of the free
    device memory holds (about 8 live activations of head_width floats per sample);
    on the CPU, the estimator's cache-sized default (None)."""
    if est.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(est.device)
    per_row = 8 * 4 * num_samples * est.config.head_width
    rows = max(1, free // 4 // per_row)
    return 1 << (int(rows).bit_length() - 1)


def model_fingerprint(est: DensityEstimator) -> str:
    """A hash of the weights and schema: a resumed job must use the same model."""
    digest = hashlib.sha256(json.dumps(est.schema.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(est.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class _Manifest:
    """The job's options and its finished ranges, on disk after every part."""

    def __init__(self, out: Path, job: dict, done: list):
        self.path, self.job, self.done = out / MANIFEST, job, done

    @classmethod
    def start(cls, out: Path, job: dict, resume: bool) -> "_Manifest":
        path = out / MANIFEST
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("format") != MANIFEST_FORMAT or saved.get("version") != MANIFEST_VERSION:
                raise ValueError(f"{path} is not a densiformer {MANIFEST_VERSION} manifest")
            differ = {k: (saved["job"].get(k), v) for k, v in job.items()
                      if k != "rows_per_part" and saved["job"].get(k) != v}
            if differ:
                lines = "; ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in differ.items())
                raise ValueError(f"cannot resume {out}: the job differs from the one it started ({lines})")
            job["rows_per_part"] = saved["job"]["rows_per_part"]  # the same chunks as before
            for tmp in out.glob(".*.tmp"):  # a part or manifest cut off by the crash
                tmp.unlink()
            return cls(out, job, [tuple(r) for r in saved["done"]])
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty: pass --resume (resume=True) to finish "
                                  "the job it holds, or choose another output")
        out.mkdir(parents=True, exist_ok=True)
        manifest = cls(out, job, [])
        manifest.save()
        return manifest

    def save(self, complete: bool = False) -> None:
        body = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "job": self.job,
                "done": sorted(self.done), "complete": complete}
        _write_atomically(self.path, lambda p: p.write_text(json.dumps(body, indent=1)))

    def rows_done(self) -> int:
        return sum(stop - start for start, stop, _ in self.done)


def part_name(start: int) -> str:
    return f"part-{start:012d}.parquet"


class _PartWriter(threading.Thread):
    """Writes parts in order, each atomically, then records it in the manifest."""

    def __init__(self, out: Path, manifest: _Manifest):
        super().__init__(daemon=True, name="densiformer-writer")
        self.out, self.manifest = out, manifest
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None

    def run(self):
        import pyarrow.parquet as pq

        while (item := self.queue.get()) is not None:
            start, stop, table = item
            if self.error is not None:
                continue  # drain: nothing after a failed write may be recorded
            try:
                name = part_name(start)
                _write_atomically(self.out / name, lambda p: pq.write_table(table, p))
                self.manifest.done.append((start, stop, name))
                self.manifest.save()
            except BaseException as err:  # reported by the caller's thread
                self.error = err

    def put(self, item):
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self):
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _Prefetcher(threading.Thread):
    """Reads chunks ahead of the computation; read errors come out in order."""

    _END = object()

    def __init__(self, chunks, depth: int = 2):
        super().__init__(daemon=True, name="densiformer-reader")
        self.chunks = chunks
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()

    def run(self):
        try:
            for chunk in self.chunks:
                while not self.stopped.is_set():
                    try:
                        self.queue.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
            self.queue.put(self._END)
        except BaseException as err:
            self.queue.put(err)

    def __iter__(self):
        self.start()
        try:
            while (item := self.queue.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stopped.set()


def _numbered_chunks(catalog, columns, rows_per_part):
    start = 0
    for table in iter_chunks(catalog, columns=columns, chunk_rows=rows_per_part):
        yield start, table
        start += table.num_rows


def infer(catalog, model, out, request=None, num_samples: int = 100, *, seed: int = 0,
          id_column: str | None = None, columns: dict | None = None, sampler: str | None = None,
          steps: int | None = None, backend: str = "auto", rows_per_part: int | None = None,
          resume: bool = False, samples: bool = False, log_prob_of=None, device="auto",
          progress: bool = True) -> InferenceResult:
    """Posterior summaries for every row of `catalog`, written to the Parquet dataset `out`.

    catalog: Parquet file or directory, CSV, FITS or HDF5 (see data.readers). model: a
    DensityEstimator or a model directory. request: target names (None: all).
    columns: {model name: catalog name} for columns named differently. id_column: copy
    this catalog column as the row id (default: a `row` column with the row index).
    rows_per_part: rows per part file (None: from free memory). resume: finish the job
    already in `out`. samples: also write the draws. log_prob_of: target names whose
    observed joint log density to add as `log_prob`.
    """
    started = time.perf_counter()
    est = model if isinstance(model, DensityEstimator) else DensityEstimator.load(model, device=device)
    est._require_fitted()
    options = InferenceOptions(request=est._request(request), num_samples=num_samples, seed=seed,
                               sampler=sampler, steps=steps, id_column=id_column, columns=dict(columns or {}),
                               samples=samples, log_prob_of=list(log_prob_of or []))
    validate_options(est, options)
    present = file_columns(catalog)
    check_catalog_columns(catalog, present, est, options)
    total = num_rows(catalog)
    out = Path(out)
    if rows_per_part is not None and rows_per_part < 1:
        raise ValueError(f"rows_per_part must be positive, got {rows_per_part}")
    job = {"catalog": str(Path(catalog).resolve()), "rows": total, "model": model_fingerprint(est),
           **options.to_dict(),
           "rows_per_part": rows_per_part or auto_rows_per_part(num_samples, len(options.request), samples)}
    manifest = _Manifest.start(out, job, resume)
    done = {start: stop for start, stop, _ in manifest.done}
    predictor = ChunkPredictor(est, options, backend, auto_rows_per_batch(est, num_samples))
    writer = _PartWriter(out, manifest)
    writer.start()
    computed = 0
    chunks = _Prefetcher(_numbered_chunks(catalog, read_columns(est, options), job["rows_per_part"]))
    bar = tqdm(total=total, initial=manifest.rows_done(), unit="row", desc="infer", disable=not progress,
               smoothing=0.1)
    try:
        for start, table in chunks:
            stop = start + table.num_rows
            if stop == start:
                continue
            if start in done:
                if done[start] != stop:
                    raise ValueError(f"cannot resume {out}: its part at row {start} ends at row {done[start]}, "
                                     f"but the catalog now gives rows {start}-{stop}")
                continue
            try:
                result = predictor(table, start)
            except ValueError as err:
                raise ValueError(f"{catalog}, rows {start}-{stop}: {err}") from err
            writer.put((start, stop, result))
            computed += table.num_rows
            bar.update(table.num_rows)
        writer.close()
    except BaseException as err:
        try:
            writer.close()  # keep every part computed before the error
        except BaseException:
            pass
        kept = manifest.rows_done()
        if isinstance(err, ValueError):
            raise ValueError(f"{err}\n{kept} of {total} rows were finished and are kept in {out}; "
                             "fix the input and run again with --resume (resume=True)") from err
        raise
    finally:
        bar.close()
    _check_complete(out, manifest, total)
    manifest.save(complete=True)
    return InferenceResult(out, total, computed, len(manifest.done), time.perf_counter() - started)


def check_catalog_columns(catalog, present, est, options):
    known = {options.file_name(c) for c in est.all_columns}
    if options.id_column and options.id_column not in present:
        raise ValueError(f"{catalog}: id column {options.id_column!r} is not in the catalog; it has {present}")
    missing_values = [c for c in options.log_prob_of if options.file_name(c) not in present]
    if missing_values:
        raise ValueError(f"{catalog}: log_prob_of needs the observed values of {missing_values}, "
                         "which the catalog does not have")
    ignored = [c for c in present if c not in known and c != options.id_column]
    if ignored:
        warnings.warn(f"{catalog}: the model does not know the columns {ignored}; they are ignored "
                      "(map names with --columns model_name=catalog_name)", stacklevel=3)
    if not known & set(present):
        warnings.warn(f"{catalog}: none of the model's columns {list(est.all_columns)} is in the catalog; "
                      "every row gets the unconditional density", stacklevel=3)


def _check_complete(out: Path, manifest: _Manifest, total: int) -> None:
    """Every input row in exactly one finished part."""
    ranges = sorted((start, stop) for start, stop, _ in manifest.done)
    expected = 0
    for start, stop in ranges:
        if start != expected:
            raise RuntimeError(f"{out}: rows {expected}-{start} are missing or duplicated in the manifest")
        expected = stop
    if expected != total:
        raise RuntimeError(f"{out}: the manifest covers {expected} of {total} rows")
    missing = [name for _, _, name in manifest.done if not (out / name).exists()]
    if missing:
        raise RuntimeError(f"{out}: parts {missing[:3]} are in the manifest but not on disk")

