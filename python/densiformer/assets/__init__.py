"""Models shipped inside the package.

`hipparcos/` is the default model of the demo: trained on the Hipparcos training split
by the command recorded in its config.json ("command"), safetensors + json, under 5 MB.
`hipparcos_colour/` is p(M_Hp | B-V, V-I) alone, for the demo's giant-or-dwarf panel:
the small default model smooths the red-dwarf branch away, this one resolves it.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "hipparcos"
COLOUR_MODEL_DIR = Path(__file__).parent / "hipparcos_colour"


def _bundled(path: Path, device):
    from ..estimator import DensityEstimator

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {path}; reinstall densiformer")
    return DensityEstimator.load(path, device=device)


def default_model(device="auto"):
    """The bundled Hipparcos model as a DensityEstimator."""
    return _bundled(DEFAULT_MODEL_DIR, device)


def colour_model(device="auto"):
    """The bundled colour-only Hipparcos model, p(abs_hpmag | b_v, v_i)."""
    return _bundled(COLOUR_MODEL_DIR, device)
