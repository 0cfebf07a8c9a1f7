"""Writing the MLX model directory: size-capped shards, index, config.json, tokenizer files."""

import json
import shutil
from pathlib import Path
from typing import Dict, List

import mlx.core as mx

from .safetensors_reader import INDEX_FILE

FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.json",
)
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ShardWriter:
    """Collects evaluated arrays and writes a shard whenever the next array would exceed max_bytes."""

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, arrays: Dict[str, mx.array]):
        mx.eval(list(arrays.values()))
        size = sum(a.nbytes for a in arrays.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(arrays)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self):
        self.shards.append(list(self.pending))
        mx.save_safetensors(str(self._tmp_name(len(self.shards))), self.pending, metadata={"format": "mlx"})
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()

    def finish(self) -> int:
        """Flush, give the shards their final names, write the index; return the number of shards."""
        if self.pending:
            self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            self._tmp_name(i).rename(self.path / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=4))
        return n

    def _tmp_name(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.safetensors"


def write_config(path: Path, config: dict, quantization: Dict[str, dict], recipe: str):
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if quantization:
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4", **quantization}
    config["ds4_mlx"] = {"recipe": recipe, "format_version": FORMAT_VERSION}
    (path / "config.json").write_text(json.dumps(config, indent=4))


def missing_tokenizer_files(src: Path) -> List[str]:
    return [name for name in REQUIRED_TOKENIZER_FILES if not (src / name).is_file()]


def copy_tokenizer(src: Path, dst: Path):
    """Copy the tokenizer and chat-template files that exist."""
    for f in [src / name for name in TOKENIZER_FILES] + sorted(src.glob("*.jinja")):
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    if (src / "encoding").is_dir():
        shutil.copytree(src / "encoding", dst / "encoding")


def prepare_output(out: Path, force: bool) -> Path:
    """Check that `out` may be written and return a fresh sibling `<out>.partial` to write into."""
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass --force to overwrite it)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left over from an interrupted conversion
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, out: Path):
    """Replace `out` by the completed `partial` directory."""
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)
