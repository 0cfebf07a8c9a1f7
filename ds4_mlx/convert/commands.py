"""The `ds4-mlx convert` command."""

from enum import Enum
from pathlib import Path

import typer

from .converter import convert as convert_checkpoint
from .recipes import RECIPES
from .safetensors_reader import CheckpointError

Recipe = Enum("Recipe", {name: name for name in RECIPES}, type=str)


def convert(
    hf_path: Path = typer.Option(..., "--hf-path", help="Official checkpoint directory (config.json + shards)."),
    mlx_path: Path = typer.Option(..., "--mlx-path", help="Output MLX model directory."),
    recipe: Recipe = typer.Option("native", help="native: lossless mxfp8/mxfp4; bf16: dequantize to bfloat16."),
    max_shard_gb: float = typer.Option(5.0, help="Maximum size of an output shard in GB (2^30 bytes)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --mlx-path."),
):
    """Convert an official DeepSeek V4 checkpoint into an MLX model directory."""
    try:
        convert_checkpoint(hf_path, mlx_path, recipe.value, int(max_shard_gb * (1 << 30)), force)
    except (CheckpointError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
