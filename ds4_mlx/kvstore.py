"""The KV cache on disk: whole-session snapshots, found again by the longest token prefix.

A snapshot holds what a session needs to go on bit for bit: every layer cache's state
(`ds4_mlx.cache.snapshot`: window ring, compressors' partial windows, compressed rows, offset),
the exact token ids, the next-token logits (so a full hit samples at once) and the caller's
`extra` JSON (e.g. tool-call id -> exact DSML text).

File `<40 hex>.kv`, little-endian:

    header    magic b"DS4MLXKV", u32 format version, u32 section count,
              32 B sha256 of the model fingerprint, u64 token count,
              32 B sha256 of the token ids (as u32), f64 creation time (unix)
    table     per section: 16 B name, u64 offset, u64 length, u32 crc32, 4 B zero
    u32       crc32 of header and table
    sections  each at a 64-byte aligned offset, in this order:
              meta     JSON {"layers": per layer the nested list structure of its state with
                       {"dtype", "shape"} for each array, "extra": the caller's dict}
              tokens   u32[token count]
              logits   f32[vocab]
              layer.i  the bytes of layer i's arrays in layout order (bf16 stays bf16)

A file is written to `<name>.tmp`, fsynced, renamed over `<name>` and the directory fsynced:
a crash leaves the old file or the new one, never half of one. A file that fails a check (magic,
version, fingerprint, sizes, a checksum, the layout) is reported with a `KVStoreWarning`,
removed and never loaded.

`index.json` lists the snapshots (token count, hash of the token ids, size, fingerprint, uses,
times) so a lookup reads no snapshot file until it has chosen one: it hashes the prompt's
prefixes at the saved lengths (one incremental pass) and confirms the exact ids from the chosen
file. The index is replaced atomically after every change, re-read by every call (so stores
opened on one directory, one process at a time, stay consistent) and rebuilt from the file
headers when it is missing or corrupt (each snapshot then starts again at one use from its
creation); entries without a file are dropped, files of another model and stale temp files
removed.

Eviction keeps `space_mb` (MiB) a hard limit on the sum of snapshot sizes: before a file is
written, the least valuable snapshots are removed until it fits (so the new one is never the
victim), and a snapshot larger than the whole budget is not written. The value of a snapshot is
the prefill it is expected to save per byte kept,

    uses * 2 ** (-age / 6 h) * tokens / size,

where `uses` counts its save and every load for a prompt it is a prefix of, and `age` is the
time since the last of them; ties go to the least recently used. Two changes to ds4's
`(hits + 1) * tokens / size`: a load credits every saved prefix of the prompt, not only the
snapshot loaded, so a long system prompt shared by many conversations gains a use from each of
their turns and outlives them, where ds4 evicts it first because its fixed part (window rings,
compressor states, logits: 18 MB for Flash) costs the most per token; and the save itself is a
use that decays, so unused snapshots lose value with age instead of keeping ds4's floor of 1.
"""

import hashlib
import json
import math
import os
import struct
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .cache import make_layer_cache, restore, snapshot
from .config import ModelArgs

MAGIC = b"DS4MLXKV"
VERSION = 1
INDEX = "index.json"
INDEX_VERSION = 1
HALF_LIFE = 6 * 3600.0
ALIGN = 64
MAX_SECTIONS = 4096

_FIXED = struct.Struct("<8sII32sQ32sd")
_SECTION = struct.Struct("<16sQQI4x")
_CRC = struct.Struct("<I")
# Array dtypes of cache states -> (mx dtype, numpy dtype of the stored bytes).
_DTYPES = {
    "bfloat16": (mx.bfloat16, np.dtype("<u2")),
    "float16": (mx.float16, np.dtype("<f2")),
    "float32": (mx.float32, np.dtype("<f4")),
    "int32": (mx.int32, np.dtype("<i4")),
}
# What reading a damaged or foreign file can raise; a load never lets these out.
_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, struct.error, OverflowError)

FINGERPRINT_SAMPLES = 16
FINGERPRINT_SAMPLE_BYTES = 4096


class KVStoreWarning(UserWarning):
    """A snapshot or index that could not be used (it is removed or rebuilt)."""


class _BadFile(Exception):
    pass


def model_fingerprint(model_dir, overrides: Optional[dict] = None) -> str:
    """Hex digest of what a snapshot's contents depend on: config.json (including the recipe
    and quantization map), the weight index, each shard's name, size and safetensors header,
    16 blocks of 4 KiB sampled evenly from each shard's data (checkpoints of the same shapes,
    such as a later release, have identical headers), and `overrides`: anything else that
    changes the caches, e.g. `model_config` overrides or the activation dtype."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    digest.update(_canonical(json.loads((model_dir / "config.json").read_text())))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        digest.update(_canonical(json.loads(index.read_text())))
    for shard in sorted(model_dir.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            (header_length,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{shard.name}\0{size}\0".encode())
            digest.update(f.read(header_length))
            start = 8 + header_length
            span = max(size - start - FINGERPRINT_SAMPLE_BYTES, 0)
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(start + span * k // (FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    digest.update(_canonical(overrides or {}))
    return digest.hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Hit:
    """A saved snapshot whose `length` token ids are a prefix of the prompt looked up."""

    file: str
    length: int
    token_hash: str
    prefixes: Tuple[str, ...] = ()  # shorter saved prefixes of the prompt (credited on load)


@dataclass
class Snapshot:
    tokens: List[int]
    caches: list  # ready to continue: model(next_ids, caches)
    logits: mx.array  # [vocab] float32, for the token after `tokens`
    extra: dict = field(default_factory=dict)


@dataclass
class _Entry:
    tokens: int
    hash: str
    size: int
    fingerprint: str
    created: float
    last_used: float
    uses: float  # as of last_used

    @classmethod
    def from_json(cls, d: dict) -> "_Entry":
        if set(d) != {f.name for f in fields(cls)}:
            raise ValueError(f"entry fields {sorted(d)}")
        return cls(int(d["tokens"]), str(d["hash"]), int(d["size"]), str(d["fingerprint"]),
                   float(d["created"]), float(d["last_used"]), float(d["uses"]))

    def decayed_uses(self, now: float) -> float:
        return self.uses * 0.5 ** (max(now - self.last_used, 0.0) / HALF_LIFE)

    def value(self, now: float) -> float:
        """Expected prefill tokens saved per byte kept."""
        return self.decayed_uses(now) * self.tokens / self.size

    def use(self, now: float):
        self.uses, self.last_used = self.decayed_uses(now) + 1, now


@dataclass
class _Header:
    fingerprint: bytes
    tokens: int
    token_hash: bytes
    created: float
    sections: Dict[str, Tuple[int, int, int]]  # name -> (offset, length, crc32)


class KVStore:
    """Session snapshots in `directory`, at most `space_mb` MiB of them, for the model whose
    `model_fingerprint` is `fingerprint`."""

    def __init__(self, directory, space_mb: float, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = int(space_mb * (1 << 20))
        self.fingerprint = hashlib.sha256(fingerprint.encode()).digest()
        for stale in self.directory.glob("*.tmp"):  # writes that a crash interrupted
            stale.unlink(missing_ok=True)
        entries = self._entries()
        if self._evict(entries, room=0):
            self._write_index(entries)

    def lookup(self, tokens: Sequence[int]) -> Optional[Hit]:
        """The saved snapshot whose token ids are the longest prefix of `tokens` (all of them
        included), or None. Reads the index and then only the chosen file's token ids."""
        entries = self._entries()
        ids = _token_array(tokens)
        by_length: Dict[int, List[str]] = {}
        for name, entry in entries.items():
            if entry.tokens <= len(ids):
                by_length.setdefault(entry.tokens, []).append(name)
        matches, hasher, done = [], hashlib.sha256(), 0
        for length in sorted(by_length):
            hasher.update(ids[done:length].tobytes())
            done, digest = length, hasher.copy().hexdigest()
            matches += [n for n in by_length[length] if entries[n].hash == digest]
        while matches:
            name = matches.pop()
            entry = entries[name]
            try:
                saved = self._read_tokens(name, entry)
            except _READ_ERRORS + (_BadFile,) as e:
                self._discard(entries, name, e)
                continue
            if np.array_equal(saved, ids[: entry.tokens]):
                return Hit(name, entry.tokens, entry.hash, tuple(matches))
        return None

    def load(self, hit: Hit, args: ModelArgs) -> Optional[Snapshot]:
        """The session saved in `hit`'s file, checked in full; None (after a warning and
        removing the file) if the file is missing, damaged or not of this model."""
        try:
            session = self._read(hit, args)
        except _READ_ERRORS + (_BadFile,) as e:
            entries = self._entries()  # drops, with a warning, an entry whose file is gone
            if not isinstance(e, FileNotFoundError):
                self._discard(entries, hit.file, e)
            return None
        entries, now = self._entries(), time.time()
        for name in (hit.file, *hit.prefixes):
            if name in entries:
                entries[name].use(now)
        self._write_index(entries)
        return session

    def extras(self) -> List[dict]:
        """The `extra` of every saved snapshot, read from the file headers and meta sections only:
        what a caller must know before it can look a prompt up (e.g. the tool-call DSML a server
        replays when it renders the prompt). A bad file is warned about and removed."""
        entries, found = self._entries(), []
        for name, entry in list(entries.items()):
            try:
                with open(self.directory / name, "rb") as f:
                    header = self._check_header(f, entry.tokens, entry.hash)
                    extra = json.loads(_read_section(f, header, "meta").tobytes())["extra"]
            except _READ_ERRORS + (_BadFile,) as e:
                self._discard(entries, name, e)
                continue
            found.append(extra)
        return found

    def save(self, tokens: Sequence[int], caches: list, logits: mx.array,
             extra: Optional[dict] = None) -> Optional[Path]:
        """Write a snapshot of `caches` after `tokens` with the next-token `logits` [vocab] and
        `extra` (JSON); replace the snapshot of the same tokens. Returns the file, or None if it
        is larger than the whole budget or the write failed (both with a warning)."""
        ids = _token_array(tokens)
        if ids.ndim != 1 or len(ids) == 0 or caches[0].offset != len(ids):
            raise ValueError(f"the caches hold {caches[0].offset} tokens, got {ids.shape} token ids")
        layouts, layers = [], []
        for state in snapshot(caches):
            arrays = []
            layouts.append(_layout(state, arrays))
            layers.append(arrays)
        meta = json.dumps({"layers": layouts, "extra": extra or {}}).encode()
        logits = logits.astype(mx.float32).reshape(logits.shape[-1])
        sections = [("meta", [meta]), ("tokens", [ids]), ("logits", [logits])]
        sections += [(f"layer.{i}", arrays) for i, arrays in enumerate(layers)]
        token_hash = hashlib.sha256(ids.tobytes()).digest()
        name = hashlib.sha256(self.fingerprint + token_hash).hexdigest()[:40] + ".kv"
        table, size = _plan(sections)
        if size > self.budget:
            warnings.warn(f"KV snapshot of {len(ids)} tokens ({size / 2**20:.1f} MiB) is larger than the whole "
                          f"budget (--kv-disk-space-mb, {self.budget / 2**20:.1f} MiB); not saved", KVStoreWarning)
            return None
        entries, now = self._entries(), time.time()
        old = entries.get(name)
        self._evict(entries, room=size)  # the old file of these tokens may go too
        path = self.directory / name
        try:
            self._write_file(path, table, sections, len(ids), token_hash, now)
        except OSError as e:
            self._write_index(entries)
            warnings.warn(f"KV snapshot {path} could not be written: {e}", KVStoreWarning)
            return None
        entry = _Entry(len(ids), token_hash.hex(), path.stat().st_size, self.fingerprint.hex(), now, now, 0.0)
        if old is not None:
            entry.uses, entry.last_used = old.uses, old.last_used
        entry.use(now)
        entries[name] = entry
        self._write_index(entries)
        return path

    # -- index

    def _entries(self) -> Dict[str, _Entry]:
        """The index, reconciled with the directory listing (and saved if that changed it)."""
        index = self.directory / INDEX
        try:
            data = json.loads(index.read_text())
            if data["version"] != INDEX_VERSION:
                raise ValueError(f"index version {data['version']}")
            entries = {str(n): _Entry.from_json(e) for n, e in data["snapshots"].items()}
        except FileNotFoundError:
            entries = {}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            warnings.warn(f"KV store index {index} is unreadable ({e}); rebuilding it from the snapshot headers",
                          KVStoreWarning)
            entries = {}
        files = {p.name for p in self.directory.glob("*.kv")}
        changed = False
        for name in sorted(set(entries) - files):
            warnings.warn(f"KV snapshot {self.directory / name} is in the index but missing; dropped", KVStoreWarning)
            del entries[name]
            changed = True
        for name in sorted(files - set(entries)):
            try:
                entries[name] = self._entry_from_header(name)
            except _READ_ERRORS + (_BadFile,) as e:
                self._remove(name, e)
            changed = True
        for name in sorted(n for n, e in entries.items() if e.fingerprint != self.fingerprint.hex()):
            self._remove(name, "made for another model (fingerprint differs)")
            del entries[name]
            changed = True
        if changed:
            self._write_index(entries)
        return entries

    def _entry_from_header(self, name: str) -> _Entry:
        path = self.directory / name
        with open(path, "rb") as f:
            header = _read_header(f, os.fstat(f.fileno()).st_size)
        size = path.stat().st_size
        return _Entry(header.tokens, header.token_hash.hex(), size, header.fingerprint.hex(),
                      header.created, header.created, 1.0)

    def _write_index(self, entries: Dict[str, _Entry]):
        data = {"version": INDEX_VERSION, "snapshots": {n: asdict(e) for n, e in sorted(entries.items())}}
        text = json.dumps(data, indent=1).encode()
        _atomic_write(self.directory / INDEX, lambda f: f.write(text))

    def _evict(self, entries: Dict[str, _Entry], room: int) -> bool:
        """Remove the least valuable snapshots until `room` more bytes fit in the budget."""
        now = time.time()
        total = sum(e.size for e in entries.values())
        evicted = False
        for name in sorted(entries, key=lambda n: (entries[n].value(now), entries[n].last_used)):
            if total + room <= self.budget:
                break
            total -= entries.pop(name).size
            (self.directory / name).unlink(missing_ok=True)
            evicted = True
        return evicted

    def _discard(self, entries: Dict[str, _Entry], name: str, problem):
        self._remove(name, problem)
        if entries.pop(name, None) is not None:
            self._write_index(entries)

    def _remove(self, name: str, problem):
        path = self.directory / name
        if isinstance(problem, FileNotFoundError):
            problem = "missing"
        elif isinstance(problem, Exception) and not isinstance(problem, _BadFile):
            problem = f"unreadable ({type(problem).__name__}: {problem})"
        warnings.warn(f"KV snapshot {path}: {problem}; removed", KVStoreWarning)
        path.unlink(missing_ok=True)

    # -- files

    def _write_file(self, path: Path, table, sections, tokens: int, token_hash: bytes, created: float):
        fixed = _FIXED.pack(MAGIC, VERSION, len(table), self.fingerprint, tokens, token_hash, created)

        def write(f):
            rows = []
            for (name, offset, length), (_, arrays) in zip(table, sections):
                f.seek(offset)
                crc = 0
                for a in arrays:
                    data = _bytes(a)
                    crc = zlib.crc32(data, crc)
                    f.write(data)
                rows.append(_SECTION.pack(name.encode(), offset, length, crc))
            header = fixed + b"".join(rows)
            f.seek(0)
            f.write(header + _CRC.pack(zlib.crc32(header)))

        _atomic_write(path, write)

    def _read_tokens(self, name: str, entry: _Entry) -> np.ndarray:
        with open(self.directory / name, "rb") as f:
            header = self._check_header(f, entry.tokens, entry.hash)
            return np.frombuffer(_read_section(f, header, "tokens"), "<u4")

    def _check_header(self, f, tokens: int, token_hash: str) -> _Header:
        header = _read_header(f, os.fstat(f.fileno()).st_size)
        if header.fingerprint != self.fingerprint:
            raise _BadFile("made for another model (fingerprint differs)")
        if header.tokens != tokens or header.token_hash.hex() != token_hash:
            raise _BadFile("its token ids are not those of the index")
        return header

    def _read(self, hit: Hit, args: ModelArgs) -> Snapshot:
        with open(self.directory / hit.file, "rb") as f:
            header = self._check_header(f, hit.length, hit.token_hash)
            meta = json.loads(_read_section(f, header, "meta").tobytes())
            ids = np.frombuffer(_read_section(f, header, "tokens"), "<u4")
            if len(ids) != hit.length or hashlib.sha256(ids.tobytes()).hexdigest() != hit.token_hash:
                raise _BadFile("its token section does not match its header")
            logits = np.frombuffer(_read_section(f, header, "logits"), "<f4")
            if len(logits) != args.vocab_size:
                raise _BadFile(f"{len(logits)} logits, the model has a vocabulary of {args.vocab_size}")
            layouts, extra = meta["layers"], meta["extra"]
            if len(layouts) != args.num_hidden_layers or not isinstance(extra, dict):
                raise _BadFile(f"{len(layouts)} layers, the model has {args.num_hidden_layers}")
            states = []
            for i, layout in enumerate(layouts):
                data = _read_section(f, header, f"layer.{i}")
                state, used = _unflatten(layout, data, 0)
                if used != len(data) or len(state) != len(make_layer_cache(args, i).state):
                    raise _BadFile(f"layer {i}'s layout does not match its data or the model")
                states.append(state)
        caches = restore(args, states)
        if any(c.offset != hit.length for c in caches):
            raise _BadFile(f"its caches do not hold {hit.length} tokens")
        return Snapshot(ids.tolist(), caches, mx.array(logits), extra)


def _token_array(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype="<u4")


def _layout(state, arrays: list):
    """The JSON structure of a cache state; its arrays are appended to `arrays` in order."""
    if isinstance(state, list):
        return [_layout(s, arrays) for s in state]
    arrays.append(state)
    return {"dtype": str(state.dtype).rsplit(".", 1)[-1], "shape": list(state.shape)}


def _unflatten(layout, data: np.ndarray, position: int):
    """(state, end position) from a layout and the bytes of its arrays from `position` on."""
    if isinstance(layout, list):
        state = []
        for item in layout:
            value, position = _unflatten(item, data, position)
            state.append(value)
        return state, position
    mx_dtype, np_dtype = _DTYPES[layout["dtype"]]
    shape = tuple(int(d) for d in layout["shape"])
    count = math.prod(shape)
    end = position + count * np_dtype.itemsize
    if min(shape, default=0) < 0 or end > len(data):
        raise _BadFile(f"array of shape {shape} does not fit its section")
    array = mx.array(np.frombuffer(data, np_dtype, count, position).reshape(shape))
    return (array.view(mx_dtype) if mx_dtype == mx.bfloat16 else array), end


def _bytes(a) -> np.ndarray:
    """The contiguous bytes of an mx array, numpy array or bytes (bf16 as its uint16 bits)."""
    if isinstance(a, mx.array):
        a = np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    return np.ascontiguousarray(np.frombuffer(a, np.uint8) if isinstance(a, bytes) else a).reshape(-1).view(np.uint8)


def _nbytes(a) -> int:
    return len(a) if isinstance(a, bytes) else a.nbytes


def _header_size(sections: int) -> int:
    return _FIXED.size + sections * _SECTION.size + _CRC.size


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _plan(sections) -> Tuple[list, int]:
    """Section table rows (name, offset, length) and the file size."""
    table, position = [], _align(_header_size(len(sections)))
    for name, arrays in sections:
        length = sum(_nbytes(a) for a in arrays)
        table.append((name, position, length))
        position = _align(position + length)
    return table, table[-1][1] + table[-1][2]


def _read_header(f, file_size: int) -> _Header:
    fixed = f.read(_FIXED.size)
    if len(fixed) < _FIXED.size:
        raise _BadFile(f"truncated: {file_size} bytes, shorter than a header")
    magic, version, count, fingerprint, tokens, token_hash, created = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise _BadFile("not a ds4-mlx KV snapshot (bad magic)")
    if version != VERSION:
        raise _BadFile(f"format version {version}; this version of ds4-mlx reads version {VERSION}")
    if count > MAX_SECTIONS:
        raise _BadFile(f"{count} sections")
    rest = f.read(count * _SECTION.size + _CRC.size)
    if len(rest) < count * _SECTION.size + _CRC.size:
        raise _BadFile(f"truncated: {file_size} bytes, shorter than its header")
    (crc,) = _CRC.unpack(rest[-_CRC.size :])
    if zlib.crc32(fixed + rest[: -_CRC.size]) != crc:
        raise _BadFile("header checksum mismatch")
    sections, end = {}, _header_size(count)
    for i in range(count):
        name, offset, length, section_crc = _SECTION.unpack_from(rest, i * _SECTION.size)
        if offset < _header_size(count):
            raise _BadFile(f"section {name!r} overlaps the header")
        sections[name.rstrip(b"\0").decode("ascii")] = (offset, length, section_crc)
        end = max(end, offset + length)
    if end != file_size:
        raise _BadFile(f"{file_size} bytes, its header says {end}" + (" (truncated)" if end > file_size else ""))
    return _Header(fingerprint, tokens, token_hash, created, sections)


def _read_section(f, header: _Header, name: str) -> np.ndarray:
    if name not in header.sections:
        raise _BadFile(f"no section {name!r}")
    offset, length, crc = header.sections[name]
    data = np.empty(length, np.uint8)
    f.seek(offset)
    if f.readinto(data) != length:
        raise _BadFile(f"section {name!r} is truncated")
    if zlib.crc32(data) != crc:
        raise _BadFile(f"section {name!r} checksum mismatch")
    return data


def _atomic_write(path: Path, write):
    """`write(file)` to `path`.tmp, fsync, rename over `path`, fsync the directory; the temp
    file is removed if anything fails."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
