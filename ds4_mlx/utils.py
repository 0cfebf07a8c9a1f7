"""Loading converted ds4-mlx model directories."""

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.nn as nn
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from .config import ModelArgs
from .model import Model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _classes(config: dict):
    if config.get("model_type") != "deepseek_v4":
        raise ValueError(f"not a DeepSeek V4 model: model_type is {config.get('model_type')!r}")
    return Model, ModelArgs


def load_model(path, lazy: bool = False, model_config: Optional[Dict[str, Any]] = None) -> Model:
    """Load a model directory written by `ds4-mlx convert`.

    `model_config` overrides config.json fields (e.g. {"fp8_activations": True}).
    """
    path = Path(path)
    _check_model_dir(path)
    return _load(path, lazy, model_config)[0]


def _check_model_dir(path: Path):
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a converted model directory (no config.json); "
                                f"run `ds4-mlx convert` first")


def _load(path: Path, lazy: bool, model_config: Optional[Dict[str, Any]]):
    return _mlx_lm_load_model(path, lazy=lazy, model_config=model_config, get_model_classes=_classes)


def load(path, lazy: bool = False, model_config: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Any]:
    """(model, tokenizer) from a converted model directory, like `mlx_lm.load`."""
    path = Path(path)
    _check_model_dir(path)
    missing = [name for name in TOKENIZER_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no tokenizer: missing {', '.join(missing)}. Copy them from the original "
            f"checkpoint (deepseek-ai/DeepSeek-V4-Flash) into this directory, or use "
            f"ds4_mlx.load_model for the model alone."
        )
    model, config = _load(path, lazy, model_config)
    return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
