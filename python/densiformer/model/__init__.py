"""Column embedding + NaN mask, the encoder, and the diffusion head."""
from .density_model import DensityModel
from .embedding import ColumnEmbedding
from .encoder import Encoder
from .head import DiffusionHead

__all__ = ["ColumnEmbedding", "DensityModel", "DiffusionHead", "Encoder"]
