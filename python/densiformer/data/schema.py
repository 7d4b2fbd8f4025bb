"""Column schema: which columns a model knows, and how each is normalised.

Each column is standardised with its median and a MAD-based scale (1.4826 * MAD, the
standard deviation for Gaussian data), as in Leung, Bovy & Speagle 2024. Medians and
MADs ignore NaN (missing). The schema is saved with the model, so physical units
round-trip exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class ColumnSchema:
    names: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self):
        if not (len(self.names) == len(self.center) == len(self.scale)):
            raise ValueError("names, center and scale must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate column names in {list(self.names)}")
        bad = [n for n, s in zip(self.names, self.scale) if not (np.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"columns {bad} have a non-positive or non-finite scale")

    @classmethod
    def fit(cls, names, matrix: np.ndarray) -> "ColumnSchema":
        """Median and MAD scale per column of `matrix` (rows x len(names)), NaN ignored.

        A column whose MAD is zero (e.g. mostly one value) falls back to its standard
        deviation, then to 1, so that normalisation never divides by zero.
        """
        names = tuple(names)
        matrix = np.asarray(matrix, dtype=np.float64)
        centers, scales = [], []
        for j, name in enumerate(names):
            col = matrix[:, j]
            col = col[~np.isnan(col)]
            if col.size == 0:
                raise ValueError(f"column {name!r} has no observed values (all {matrix.shape[0]} rows are NaN)")
            med = float(np.median(col))
            scale = MAD_TO_STD * float(np.median(np.abs(col - med)))
            if not scale > 0:
                scale = float(np.std(col))
            if not scale > 0:
                scale = 1.0
            centers.append(med)
            scales.append(scale)
        return cls(names, tuple(centers), tuple(scales))

    def index(self, names) -> list[int]:
        """Positions of `names` in the schema; ValueError naming any unknown one."""
        lookup = {n: i for i, n in enumerate(self.names)}
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; known: {list(self.names)}")
        return [lookup[n] for n in names]

    def _params(self, names):
        idx = self.index(names) if names is not None else list(range(len(self.names)))
        return np.asarray(self.center)[idx], np.asarray(self.scale)[idx]

    def normalize(self, values: np.ndarray, names=None) -> np.ndarray:
        """Physical -> normalised units; the last axis follows `names` (default: all)."""
        center, scale = self._params(names)
        return ((np.asarray(values, dtype=np.float64) - center) / scale).astype(np.float32)

    def denormalize(self, values: np.ndarray, names=None) -> np.ndarray:
        """Normalised -> physical units, in float64."""
        center, scale = self._params(names)
        return np.asarray(values, dtype=np.float64) * scale + center

    def log_abs_det(self, names) -> float:
        """log |d z / d x| of the normalisation for these columns.

        A density in normalised units plus this gives the density in physical units.
        """
        _, scale = self._params(names)
        return float(-np.log(scale).sum())

    def to_dict(self) -> dict:
        return {"names": list(self.names), "center": list(self.center), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "ColumnSchema":
        return cls(tuple(d["names"]), tuple(float(c) for c in d["center"]), tuple(float(s) for s in d["scale"]))
