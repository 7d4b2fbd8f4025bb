"""densiformer: conditional densities of tabular data with a Transformer encoder and a diffusion head."""
__version__ = "0.1.0"

from . import datasets, ops  # noqa: E402
from . import nn  # noqa: E402
from .guidance import events  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .estimator import DensityEstimator  # noqa: E402

__all__ = ["DensityEstimator", "ModelConfig", "datasets", "nn", "ops", "__version__"]
