"""Models shipped inside the package.

`hipparcos/` is the default model of the demo: trained on the Hipparcos training split
by the command recorded in its config.json ("command"), safetensors + json, under 5 MB.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "hipparcos"


def default_model(device="auto"):
    """The bundled Hipparcos model as a DensityEstimator."""
    from ..estimator import DensityEstimator

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {DEFAULT_MODEL_DIR}; reinstall densiformer")
    return DensityEstimator.load(DEFAULT_MODEL_DIR, device=device)
