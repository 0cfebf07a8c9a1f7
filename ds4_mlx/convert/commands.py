"""The `ds4-mlx convert` and `ds4-mlx imatrix` commands."""

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from mlx_lm.utils import load_tokenizer

from ..utils import load_model
from . import imatrix as imx
from .converter import convert as convert_checkpoint
from .converter import dry_run as plan_checkpoint
from .hub import checkpoint_dir, upload
from .recipes import RECIPES
from .safetensors_reader import CheckpointError
from .summary import format_table
from .writer import missing_tokenizer_files

Recipe = Enum("Recipe", {name: name for name in RECIPES}, type=str)


def _fail(e: Exception):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Official checkpoint: local directory or Hugging Face repo id."),
    mlx_path: Optional[Path] = typer.Option(None, "--mlx-path", help="Output MLX model directory."),
    recipe: Recipe = typer.Option(
        "native", help="native: lossless mxfp8/mxfp4; bf16: dequantize to bfloat16; q2 / q4: routed experts at "
        "2 / 4 bits, embedding and head at 8 bits, the rest as shipped."),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", help="q2/q4: inputs per scale and bias of the routed experts (32, 64 or 128; "
        "default q2 128, q4 64)."),
    imatrix: Optional[Path] = typer.Option(
        None, "--imatrix", exists=True, dir_okay=False, help="q2/q4: statistics from `ds4-mlx imatrix`."),
    max_shard_gb: float = typer.Option(5.0, help="Maximum size of an output shard in GB (2^30 bytes)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --mlx-path."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the output sizes from the shard headers only."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print one JSON object."),
    upload_repo: Optional[str] = typer.Option(None, "--upload-repo", help="Upload the result to this Hub repo."),
):
    """Convert an official DeepSeek V4 checkpoint into an MLX model directory."""
    try:
        if dry_run:
            summary = plan_checkpoint(checkpoint_dir(hf_path), recipe.value, group_size)
            typer.echo(json.dumps(summary) if as_json else format_table(summary))
            return
        if mlx_path is None:
            raise ValueError("--mlx-path is required (or pass --dry-run)")
        convert_checkpoint(checkpoint_dir(hf_path), mlx_path, recipe.value, int(max_shard_gb * (1 << 30)), force,
                           group_size, imatrix)
        if upload_repo:
            upload(mlx_path, upload_repo)
    except (CheckpointError, FileExistsError, ValueError) as e:
        _fail(e)


def _tokenizer(model: Path):
    missing = missing_tokenizer_files(model)
    if missing:
        raise FileNotFoundError(f"{model} has no {', '.join(missing)}: text prompts need the tokenizer (copy its "
                                f"files from the checkpoint) or give token ids instead")
    return load_tokenizer(model)


def imatrix(
    model: Path = typer.Option(..., "--model", help="Converted model directory (native or bf16 recipe)."),
    prompts: Path = typer.Option(
        ..., "--prompts", exists=True, dir_okay=False, help="One prompt per line: text, {\"text\": ...} in a "
        ".jsonl file, or whitespace-separated token ids."),
    out: Path = typer.Option(..., "--out", help="Output file (safetensors)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="Stop after this many tokens."),
):
    """Collect the routed experts' input statistics that `convert --imatrix` weights the quantization error with."""
    try:
        ids = imx.read_prompts(prompts, lambda: _tokenizer(model))
        stats, tokens = imx.collect(load_model(model), ids, max_tokens)
    except (FileNotFoundError, ValueError) as e:
        _fail(e)
    imx.save(out, stats, tokens)
    print(f"imatrix of {len(stats)} MoE layers from {tokens} tokens written to {out}", file=sys.stderr)
