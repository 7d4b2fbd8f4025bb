"""Catalog batch inference: streaming and resumable on one machine (`infer`), or
scaled out with Ray Data (`densiformer.inference.ray`, imported on demand)."""
from .catalog import InferenceResult, infer
from .predict import ChunkPredictor, InferenceOptions

__all__ = ["ChunkPredictor", "InferenceOptions", "InferenceResult", "infer"]
