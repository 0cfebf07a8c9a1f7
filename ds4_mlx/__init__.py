"""ds4-mlx: DeepSeek V4 Flash on MLX."""

import os

# DeepSeek V4 keeps its hyper-connection mixing, Hadamard rotation and routing in fp32. MLX runs
# float32 matrix products as TF32 on GPUs that have it (about 1e-3 relative error) unless
# MLX_ENABLE_TF32=0; set it before the first product unless the user chose otherwise.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .model import Model
from .config import ModelArgs
from .utils import load, load_model

__all__ = ["Model", "ModelArgs", "load", "load_model"]
