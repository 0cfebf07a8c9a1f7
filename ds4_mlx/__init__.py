"""ds4-mlx: DeepSeek V4 Flash on MLX."""

import os
import sys

# DeepSeek V4 keeps its hyper-connection mixing, Hadamard rotation and routing in fp32. MLX runs
# float32 matrix products as TF32 on GPUs that have it (about 1e-3 relative error) unless
# MLX_ENABLE_TF32=0; set it before the first product unless the user chose otherwise.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from . import model as _model  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .generate import Session, generate, stream_generate  # noqa: E402
from .model import Model  # noqa: E402
from .utils import load, load_model  # noqa: E402

# mlx-lm finds model classes as the module `mlx_lm.models.<model_type>`: with this, mlx_lm.load,
# mlx_lm.generate, mlx_lm.stream_generate and mlx_lm.server accept ds4-mlx model directories.
sys.modules.setdefault("mlx_lm.models.deepseek_v4", _model)

__all__ = ["Model", "ModelArgs", "Session", "generate", "load", "load_model", "stream_generate"]
