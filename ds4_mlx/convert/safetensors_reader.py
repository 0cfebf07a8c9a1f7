"""A small safetensors reader: parses headers itself and reads one tensor at a time into numpy."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

INDEX_FILE = "model.safetensors.index.json"

# On-disk dtype -> numpy dtype of the raw bytes (FP8 and E8M0 stay uint8, BF16 stays uint16).
NP_DTYPES = {
    "F8_E4M3": np.uint8,
    "F8_E8M0": np.uint8,
    "U8": np.uint8,
    "I8": np.int8,
    "BF16": np.uint16,
    "F16": np.float16,
    "F32": np.float32,
    "I32": np.int32,
    "I64": np.int64,
}


class CheckpointError(Exception):
    """The checkpoint is missing, incomplete or not in the official DeepSeek V4 layout."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str
    shape: tuple
    start: int  # absolute byte offsets in the shard file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def read_header(path: Path) -> Dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise CheckpointError(f"shard {path.name} is truncated: {size} bytes, header needs {8 + n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"shard {path.name}: header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    return {name: _tensor_info(path, name, entry, 8 + n, size) for name, entry in header.items()}


def _tensor_info(path: Path, name: str, entry: dict, base: int, size: int) -> TensorInfo:
    try:
        begin, end = entry["data_offsets"]
        info = TensorInfo(name, path.name, entry["dtype"], tuple(entry["shape"]), base + begin, base + end)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"tensor {name} in shard {path.name}: malformed header entry {entry}") from None
    if info.stop > size:
        raise CheckpointError(
            f"shard {path.name} is truncated: tensor {name} ends at byte {info.stop}, the file has {size}"
        )
    if info.dtype in NP_DTYPES:
        need = math.prod(info.shape) * np.dtype(NP_DTYPES[info.dtype]).itemsize
        if need != info.nbytes:
            raise CheckpointError(
                f"tensor {name} in shard {path.name}: {info.dtype} {list(info.shape)} needs {need} bytes, "
                f"the header gives {info.nbytes}"
            )
    return info


class Checkpoint:
    """config.json + shards of a checkpoint directory; tensors are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint directory: no config.json")
        self.config = json.loads(config.read_text())
        self.tensors = self._tensor_table()

    def _tensor_table(self) -> Dict[str, TensorInfo]:
        index = self.path / INDEX_FILE
        if not index.is_file():
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"no {INDEX_FILE} and no *.safetensors in {self.path}")
            return {k: v for s in shards for k, v in read_header(s).items()}
        weight_map = json.loads(index.read_text())["weight_map"]
        headers = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{INDEX_FILE} maps tensor {name} to shard {shard}, which does not exist")
                headers[shard] = read_header(self.path / shard)
            if name not in headers[shard]:
                raise CheckpointError(f"{INDEX_FILE} maps tensor {name} to shard {shard}, which has no such tensor")
        return {name: headers[shard][name] for name, shard in weight_map.items()}

    def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The raw tensor as numpy (see NP_DTYPES), read into `out` when given."""
        t = self.tensors[name]
        if out is None:
            out = np.empty(t.shape, NP_DTYPES[t.dtype])
        with open(self.path / t.shard, "rb") as f:
            f.seek(t.start)
            if f.readinto(memoryview(out).cast("B")) != t.nbytes:
                raise CheckpointError(f"tensor {name} in shard {t.shard}: short read, the shard is truncated")
        return out
