"""`ds4-mlx convert`: official DeepSeek V4 checkpoint -> MLX model directory."""

from .converter import convert, dry_run
from .recipes import RECIPES
from .safetensors_reader import CheckpointError

__all__ = ["convert", "dry_run", "CheckpointError", "RECIPES"]
