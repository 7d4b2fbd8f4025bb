"""Model hyper-parameters."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    """Sizes of the encoder and the diffusion head.

    The defaults are small enough to train on a laptop CPU in minutes. The paper's
    release is `ModelConfig.paper()`: d_model 192, 2 encoder layers, 24 heads (head
    dimension 8), and a 5 x 512 head.
    """

    d_model: int = 64
    encoder_layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    head_width: int = 256
    head_layers: int = 3
    time_features: int = 16
    dropout: float = 0.0
    schedule: str = "cosine"

    def __post_init__(self):
        for name in ("d_model", "encoder_layers", "heads", "ff_mult", "head_width", "head_layers", "time_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.time_features % 2:
            raise ValueError(f"time_features must be even, got {self.time_features}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def paper(cls) -> "ModelConfig":
        return cls(d_model=192, encoder_layers=2, heads=24, ff_mult=4, head_width=512, head_layers=5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)
