"""Writing the MLX model directory: planned shards streamed to disk, index, config.json, tokenizer files,
and the manifest that lets an interrupted conversion resume.

The output is built in `<out>.partial`: each shard is written as `<name>.tmp` and renamed when complete,
then recorded (size, sha256) in the manifest. config.json is written last and only into the final
directory, so neither `.partial` nor a half-written shard ever loads as a model.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from .plan import OutTensor
from .safetensors_reader import INDEX_FILE

FORMAT_VERSION = 1
MANIFEST = "ds4-convert-manifest.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.json",
)
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _as_bytes(piece) -> memoryview:
    """The raw bytes of a numpy or (evaluated) MLX array in C order."""
    if isinstance(piece, mx.array):
        piece = np.array(piece.view(mx.uint16) if piece.dtype == mx.bfloat16 else piece)
    return memoryview(np.ascontiguousarray(piece)).cast("B")


class ShardFile:
    """One safetensors shard whose tensors are known in advance: the header is written first, then the
    tensor bytes in header order as pieces arrive; pieces of a later tensor wait in memory for their turn."""

    def __init__(self, path: Path, tensors: List[OutTensor], progress=None):
        self.path, self.tmp, self.progress = path, path.with_name(path.name + ".tmp"), progress
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [t.name for t in tensors]
        self.left = {t.name: t.nbytes for t in tensors}
        self.waiting: Dict[str, List[memoryview]] = {}
        self.current = 0
        self.sha = hashlib.sha256()
        self.file = open(self.tmp, "wb")
        self._write(len(raw).to_bytes(8, "little") + raw)

    def _write(self, data):
        self.file.write(data)
        self.sha.update(data)

    def add(self, name: str, piece):
        """Append the next piece (rows in C order) of tensor `name`."""
        if name not in self.left:
            raise RuntimeError(f"{self.path.name}: tensor {name} is not planned for this shard")
        self.waiting.setdefault(name, []).append(_as_bytes(piece))
        while self.current < len(self.order):
            name = self.order[self.current]
            for data in self.waiting.pop(name, []):
                self._append(name, data)
            if self.left[name]:
                return
            self.current += 1

    def _append(self, name: str, data: memoryview):
        if data.nbytes > self.left[name]:
            raise RuntimeError(f"{self.path.name}: tensor {name} got more bytes than its planned shape holds")
        self.left[name] -= data.nbytes
        self._write(data)
        if self.progress is not None:
            self.progress.update(data.nbytes)

    def close(self) -> dict:
        """Finish the shard, give it its final name; return its manifest entry {size, sha256}."""
        self.file.close()
        short = [n for n, left in self.left.items() if left]
        if short:
            raise RuntimeError(f"{self.path.name}: tensors {', '.join(short)} are incomplete")
        os.replace(self.tmp, self.path)
        return {"size": self.path.stat().st_size, "sha256": self.sha.hexdigest()}

    def abort(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _write_json(path: Path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    os.replace(tmp, path)


def prepare_output(out: Path, force: bool, fingerprint: str) -> tuple:
    """Check that `out` may be written; return (`<out>.partial`, the verified shards {name: {size, sha256}}
    that an interrupted conversion with the same fingerprint left there). Anything else in `.partial` goes."""
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass --force to overwrite it)")
    partial = out.with_name(out.name + ".partial")
    manifest = _read_manifest(partial)
    if manifest.get("fingerprint") != fingerprint and partial.exists():
        print(f"discarding {partial}: left by a conversion with other options or another checkpoint", file=sys.stderr)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    done = {
        name: entry
        for name, entry in manifest.get("shards", {}).items()
        if manifest.get("fingerprint") == fingerprint and _intact(partial / name, entry)
    }
    for f in partial.iterdir():
        if f.name not in done and f.name != MANIFEST:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    save_manifest(partial, fingerprint, done)
    return partial, done


def _read_manifest(partial: Path) -> dict:
    try:
        return json.loads((partial / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _intact(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def save_manifest(partial: Path, fingerprint: str, done: Dict[str, dict]):
    _write_json(partial / MANIFEST, {"fingerprint": fingerprint, "shards": done})


def write_index(path: Path, weight_map: Dict[str, str], total_bytes: int):
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=4))


def model_config(config: dict, quantization: Dict[str, dict], recipe: str) -> dict:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if quantization:
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4", **quantization}
    config["ds4_mlx"] = {"recipe": recipe, "format_version": FORMAT_VERSION}
    return config


def missing_tokenizer_files(src: Path) -> List[str]:
    return [name for name in REQUIRED_TOKENIZER_FILES if not (src / name).is_file()]


def copy_tokenizer(src: Path, dst: Path):
    """Copy the tokenizer and chat-template files that exist."""
    for f in [src / name for name in TOKENIZER_FILES] + sorted(src.glob("*.jinja")):
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    if (src / "encoding").is_dir():
        shutil.copytree(src / "encoding", dst / "encoding", dirs_exist_ok=True)


def publish(partial: Path, out: Path, config: dict):
    """Replace `out` by the completed `partial` directory, then write its config.json (last)."""
    (partial / MANIFEST).unlink()
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)
    _write_json(out / "config.json", config)

