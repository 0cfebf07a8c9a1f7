"""ds4-mlx: DeepSeek V4 Flash on MLX."""

from .model import Model
from .config import ModelArgs
from .utils import load, load_model

__all__ = ["Model", "ModelArgs", "load", "load_model"]
