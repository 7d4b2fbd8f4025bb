"""Throughput of `densiformer infer`, Parquet in to Parquet out, with peak memory.

The catalog is the Hipparcos catalogue resampled with its own noise (each copy of a
star gets its magnitude, colour, parallax and proper motions redrawn from their
errors) to --rows rows. `densiformer infer` runs as a subprocess with the bundled
model; its resident memory is sampled every 0.5 s, so the JSON shows whether it stays
flat as rows stream through, and reports the peak.

    python benchmarks/bench_infer.py --rows 1000000 --num-samples 100
    python benchmarks/bench_infer.py --rows 1000000 --num-samples 100 1000 --max-seconds 0 600

A run stopped by --max-seconds (0 = no limit) reports the rate between its first
and last finished part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info, write_result  # noqa: E402

COLUMNS = ["hip", "hpmag", "b_v", "v_i", "plx", "e_plx", "pmra", "pmdec"]
NOISY = {"hpmag": "e_hpmag", "b_v": "e_b_v", "plx": "e_plx", "pmra": "e_pmra", "pmdec": "e_pmdec"}


def resampled_hipparcos(path: Path, rows: int, seed: int = 0, rows_per_group: int = 1 << 16) -> None:
    """Write `rows` noisy copies of Hipparcos stars to Parquet, one row group at a time."""
    from densiformer.datasets import hipparcos

    stars = hipparcos()
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([(c, pa.int64() if c == "hip" else pa.float64()) for c in COLUMNS])) as w:
        for start in range(0, rows, rows_per_group):
            pick = stars.iloc[rng.integers(0, len(stars), min(rows_per_group, rows - start))]
            columns = {c: pick[c].to_numpy() for c in COLUMNS}
            for value, error in NOISY.items():
                columns[value] = columns[value] + rng.normal(size=len(pick)) * np.nan_to_num(pick[error].to_numpy())
            w.write_table(pa.table(columns))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(catalog: Path, out: Path, num_samples: int, extra: list[str], max_seconds: float | None = None) -> dict:
    from densiformer.assets import DEFAULT_MODEL_DIR

    command = [sys.executable, "-m", "densiformer", "infer", str(catalog), "--model", str(DEFAULT_MODEL_DIR),
               "--request", "abs_hpmag", "--num-samples", str(num_samples), "--out", str(out), *extra]
    started = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    trace = []  # (seconds, rows written, RSS bytes)
    manifest = out / "_manifest.json"
    while job.poll() is None:
        if max_seconds and time.perf_counter() - started > max_seconds:
            job.kill()  # a partial run: its rate counts the rows finished by then
            job.wait()
            break
        try:
            done = sum(b - a for a, b, _ in json.loads(manifest.read_text())["done"]) if manifest.exists() else 0
            trace.append((round(time.perf_counter() - started, 1), done, rss_bytes(job.pid)))
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    seconds = time.perf_counter() - started
    partial = job.returncode == -9
    if job.returncode and not partial:
        raise RuntimeError(f"{' '.join(command)} failed with {job.returncode}")
    rows = pq.read_metadata(catalog).num_rows
    written = trace[-1][1] if partial else pq.read_table(out, columns=["row"]).num_rows
    if not partial and written != rows:
        raise RuntimeError("the output does not have one row per input row")
    if partial:  # rows finished by the time the last finished part appeared, start-up included
        done = trace[-1][1]
        if done == 0:
            raise RuntimeError(f"no part finished within {max_seconds} s: raise --max-seconds")
        rate = done / next(t for t, d, _ in trace if d == done)
    else:
        rate = rows / seconds
    rss = [r for _, _, r in trace]
    half = len(rss) // 2
    return {"command": " ".join(command[1:]), "catalog_rows": rows, "rows_done": written, "complete": not partial,
            "num_samples": num_samples, "seconds": seconds, "rows_per_second": rate,
            "peak_rss_mib": max(rss) / 2**20,
            "rss_mib_first_half_max": max(rss[:half] or [0]) / 2**20,
            "rss_mib_second_half_max": max(rss[half:] or [0]) / 2**20,
            "trace_seconds_rows_rss_mib": [(t, d, round(r / 2**20)) for t, d, r in trace[::max(1, len(trace) // 60)]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-samples", type=int, nargs="+", default=[100])
    parser.add_argument("--work-dir", help="where the catalog and outputs go (default: a temporary directory)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/infer.json)")
    parser.add_argument("--infer-args", default="", help="extra arguments for densiformer infer")
    parser.add_argument("--max-seconds", type=float, nargs="+",
                        help="per --num-samples entry: stop the run after this long and report the rate so far")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_infer_"))
    work.mkdir(parents=True, exist_ok=True)
    catalog = work / f"hipparcos_resampled_{args.rows}.parquet"
    if not catalog.exists():
        started = time.perf_counter()
        resampled_hipparcos(catalog, args.rows)
        print(f"catalog of {args.rows:,} rows written in {time.perf_counter() - started:.0f} s")
    runs = []
    limits = args.max_seconds or [None] * len(args.num_samples)
    for num_samples, limit in zip(args.num_samples, limits):
        out = work / f"out_{num_samples}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        result = run(catalog, out, num_samples, args.infer_args.split(), limit)
        print(f"{num_samples} samples: {result['rows_per_second']:.0f} rows/s, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB ({result['rss_mib_first_half_max']:.0f} / "
              f"{result['rss_mib_second_half_max']:.0f} MiB in the first / second half)")
        runs.append(result)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result("infer", {"environment": device_info(device), "catalog_rows": args.rows, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
