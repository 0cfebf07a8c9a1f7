"""The KV cache on disk (ds4_mlx.kvstore): exact round trips, longest-prefix lookup through the
index, rejection of damaged and foreign files, the hard budget and the eviction order."""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_fp32, random_ids

from ds4_mlx import load_model
from ds4_mlx.cache import snapshot
from ds4_mlx.config import ModelArgs
from ds4_mlx.convert import convert
from ds4_mlx.kvstore import INDEX, HALF_LIFE, KVStore, KVStoreWarning, model_fingerprint

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from kvstore_io import synthetic_session  # noqa: E402

# Window-only and CSA layers with small dims: about 34 KB fixed + 100 B per token, so the fixed
# part weighs on short snapshots about as much as Flash's 18 MB + 6.9 KB per token does.
ARGS = ModelArgs(num_hidden_layers=3, compress_ratios=[0, 4, 4], head_dim=64, index_head_dim=32,
                 sliding_window=16, vocab_size=512)
FP = "model-a"


def tokens(length, seed=0, prefix=()):
    rest = np.random.default_rng(seed).integers(0, ARGS.vocab_size, length - len(prefix)).tolist()
    return list(prefix) + rest


def save(store, ids, seed=0, extra=None):
    caches, logits = synthetic_session(ARGS, len(ids), seed)
    return store.save(ids, caches, logits, extra)


def leaves(state):
    for item in state:
        yield from leaves(item) if isinstance(item, list) else [item]


def assert_same_state(ours, theirs):
    ours, theirs = list(leaves(ours)), list(leaves(theirs))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()


def snapshot_files(directory):
    return sorted(p.name for p in Path(directory).glob("*.kv"))


def index(directory):
    return json.loads((Path(directory) / INDEX).read_text())["snapshots"]


def edit_index(directory, name, **fields):
    data = json.loads((Path(directory) / INDEX).read_text())
    data["snapshots"][name].update(fields)
    (Path(directory) / INDEX).write_text(json.dumps(data))


# -- round trips


def test_save_then_load_in_a_fresh_store_is_exact(tmp_path):
    ids = tokens(300)
    caches, logits = synthetic_session(ARGS, 300, seed=1)
    extra = {"call_1": "<｜DSML｜invoke name=\"f\">"}
    path = KVStore(tmp_path, 100, FP).save(ids, caches, logits, extra)
    # bf16 stays bf16: the file is the caches' own bytes + token ids + logits + a small header
    assert path.stat().st_size - sum(c.nbytes for c in caches) - 4 * 300 - 4 * ARGS.vocab_size < 8192

    store = KVStore(tmp_path, 100, FP)
    hit = store.lookup(ids + [7, 8, 9])
    assert hit.length == 300
    session = store.load(hit, ARGS)
    assert session.tokens == ids and session.extra == extra
    assert session.logits.dtype == mx.float32 and mx.array_equal(session.logits, logits).item()
    assert_same_state(snapshot(session.caches), snapshot(caches))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_restored_session_continues_exactly_like_an_uninterrupted_one(small_native, tmp_path, dtype):
    model = load_model(small_native) if dtype == "bfloat16" else load_fp32(small_native)
    ids = random_ids(200, model.args.vocab_size, seed=5)
    caches = model.make_cache()
    prefill = model(ids[:, :150], caches)
    assert KVStore(tmp_path, 100, FP).save(ids[0, :150].tolist(), caches, prefill[0, -1]) is not None
    saved = snapshot(caches)  # with row buffers larger than their rows, as a live session has
    uninterrupted = model(ids[:, 150:], caches)

    store = KVStore(tmp_path, 100, FP)
    session = store.load(store.lookup(ids[0].tolist()), model.args)
    assert session.tokens == ids[0, :150].tolist()
    assert mx.array_equal(session.logits, prefill[0, -1]).item()
    assert_same_state(snapshot(session.caches), saved)
    assert mx.array_equal(model(ids[:, 150:], session.caches), uninterrupted).item()


# -- lookup


def test_lookup_finds_the_longest_saved_prefix(tmp_path, monkeypatch):
    store = KVStore(tmp_path, 100, FP)
    base = tokens(400)
    other = tokens(300, seed=1, prefix=base[:60])  # shares 60 tokens with base
    for ids in (base[:50], base[:120], base[:400], other):
        save(store, ids)
    opened, read_tokens = [], KVStore._read_tokens

    def counting(self, name, entry):
        opened.append(name)
        return read_tokens(self, name, entry)

    monkeypatch.setattr(KVStore, "_read_tokens", counting)

    assert store.lookup(base + [1, 2]).length == 400
    assert store.lookup(base[:400]).length == 400  # all of the prompt: sample from the saved logits
    assert store.lookup(base[:399]).length == 120
    assert store.lookup(base[:120]).length == 120
    assert store.lookup(base[:100]).length == 50
    assert store.lookup(other + [5]).length == 300
    assert store.lookup(other[:299]).length == 50
    assert store.lookup(base[:49]) is None and store.lookup(tokens(500, seed=9)) is None
    assert len(opened) == 7  # only the chosen file of each hit was opened


def test_extras_are_read_without_loading_and_skip_bad_files(tmp_path):
    store = KVStore(tmp_path, 100, FP)
    save(store, tokens(40, seed=1), extra={"tool_call_dsml": {"call_a": "A"}})
    bad = save(store, tokens(50, seed=2), extra={"tool_call_dsml": {"call_b": "B"}})
    _flip_byte(bad, _section_offset(bad, "meta"))
    with pytest.warns(KVStoreWarning, match="checksum"):
        assert store.extras() == [{"tool_call_dsml": {"call_a": "A"}}]
    assert not bad.exists()


def test_saving_the_same_tokens_again_replaces_the_snapshot(tmp_path):
    store = KVStore(tmp_path, 100, FP)
    ids = tokens(100)
    first = save(store, ids, extra={"v": 1})
    second = save(store, ids, seed=3, extra={"v": 2})
    assert first == second and snapshot_files(tmp_path) == [first.name]
    assert store.load(store.lookup(ids), ARGS).extra == {"v": 2}


def test_a_lost_index_is_rebuilt_from_the_headers(tmp_path):
    store = KVStore(tmp_path, 100, FP)
    ids = tokens(100)
    save(store, ids)
    (tmp_path / INDEX).unlink()
    assert store.lookup(ids).length == 100
    (tmp_path / INDEX).write_text("{not json")
    with pytest.warns(KVStoreWarning, match="index .* unreadable"):
        store = KVStore(tmp_path, 100, FP)
    assert store.load(store.lookup(ids), ARGS).tokens == ids


def test_stale_temp_files_are_removed_on_open(tmp_path):
    (tmp_path / ("0" * 40 + ".kv.tmp")).write_bytes(b"half a snapshot")
    KVStore(tmp_path, 100, FP)
    assert list(tmp_path.glob("*.tmp")) == []


# -- damaged and foreign files


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _section_offset(path, name):
    data = path.read_bytes()
    count = struct.unpack_from("<I", data, 12)[0]
    for i in range(count):
        entry = struct.unpack_from("<16sQQI4x", data, 96 + 40 * i)
        if entry[0].rstrip(b"\0").decode() == name:
            return entry[1]


def _flip_byte(path, offset):
    _patch(path, offset, bytes([path.read_bytes()[offset] ^ 0x40]))


def _set_version(path, version):
    _patch(path, 8, struct.pack("<I", version))
    data = path.read_bytes()
    count = struct.unpack_from("<I", data, 12)[0]
    end = 96 + 40 * count
    _patch(path, end, struct.pack("<I", zlib.crc32(data[:end])))


def _foreign(path):
    other = path.parent / "other"
    foreign = save(KVStore(other, 100, "model-b"), tokens(120))
    shutil.copy(foreign, path)
    shutil.rmtree(other)


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "truncated"),
    "flipped byte in a layer": (lambda p: _flip_byte(p, _section_offset(p, "layer.1") + 500), "layer.1.* checksum"),
    "flipped byte in the header": (lambda p: _flip_byte(p, 30), "header checksum"),
    "another model": (_foreign, "another model"),
    "bad magic": (lambda p: _patch(p, 0, b"GGUF\0\0\0\0"), "bad magic"),
    "newer version": (lambda p: _set_version(p, 99), "format version 99"),
    "garbage": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "bad magic"),
    "empty": (lambda p: p.write_bytes(b""), "truncated"),
    "missing": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_or_foreign_snapshot_is_reported_removed_and_never_loaded(tmp_path, damage):
    store = KVStore(tmp_path, 100, FP)
    ids = tokens(120)
    path = save(store, ids)
    corrupt, message = DAMAGE[damage]
    corrupt(path)
    with pytest.warns(KVStoreWarning, match=message):
        hit = store.lookup(ids)
        assert hit is None or store.load(hit, ARGS) is None
    assert not path.exists() and index(tmp_path) == {}
    # the store keeps working
    save(store, ids)
    assert store.load(store.lookup(ids), ARGS).tokens == ids


def test_a_snapshot_damaged_after_lookup_is_not_loaded(tmp_path):
    store = KVStore(tmp_path, 100, FP)
    ids = tokens(120)
    path = save(store, ids)
    hit = store.lookup(ids)
    _flip_byte(path, _section_offset(path, "logits") + 8)
    with pytest.warns(KVStoreWarning, match=f"{path.name}.*logits.* checksum.*removed"):
        assert store.load(hit, ARGS) is None
    assert not path.exists() and store.lookup(ids) is None


@pytest.mark.parametrize("damage", ["garbage", "another model", "truncated"])
def test_bad_files_found_when_the_index_is_rebuilt_are_removed(tmp_path, damage):
    store = KVStore(tmp_path, 100, FP)
    good, bad = tokens(100), tokens(120, seed=1)
    save(store, good)
    path = save(store, bad)
    DAMAGE[damage][0](path)
    (tmp_path / INDEX).unlink()
    with pytest.warns(KVStoreWarning, match=DAMAGE[damage][1]):
        store = KVStore(tmp_path, 100, FP)
    assert not path.exists() and store.lookup(bad) is None and store.lookup(good).length == 100


def test_files_of_another_model_are_removed_when_the_store_opens(tmp_path):
    save(KVStore(tmp_path, 100, "model-b"), tokens(100))
    with pytest.warns(KVStoreWarning, match="another model"):
        store = KVStore(tmp_path, 100, FP)
    assert snapshot_files(tmp_path) == [] and store.lookup(tokens(100)) is None


# -- budget and eviction


def size_of(length):
    return 34_500 + 100 * length  # a little more than a snapshot of `length` tokens of ARGS


def use(store, ids):
    """A turn of the conversation `ids`: look it up and load what it finds."""
    assert store.load(store.lookup(ids + [1]), ARGS) is not None


def test_a_snapshot_larger_than_the_budget_is_not_written(tmp_path):
    store = KVStore(tmp_path, size_of(100) / 2**20, FP)
    save(store, tokens(50))
    with pytest.warns(KVStoreWarning, match="larger than the whole"):
        assert save(store, tokens(1000, seed=1)) is None
    assert len(snapshot_files(tmp_path)) == 1


def test_the_budget_is_never_exceeded_and_the_new_snapshot_is_kept(tmp_path):
    budget = 5 * size_of(300)
    store = KVStore(tmp_path, budget / 2**20, FP)
    rng = np.random.default_rng(0)
    saved, evictions = [], 0
    for step in range(30):
        hit = store.lookup(saved[rng.integers(len(saved))]) if saved else None
        if hit is not None and rng.random() < 0.5:
            assert store.load(hit, ARGS) is not None
        before = {p.name: p.stat().st_size for p in tmp_path.glob("*.kv")}
        ids = tokens(int(rng.integers(20, 600)), seed=step)
        path = save(store, ids)
        saved.append(ids)
        after = {p.name: p.stat().st_size for p in tmp_path.glob("*.kv")}
        assert path.exists() and sum(after.values()) <= budget
        assert {n: e["size"] for n, e in index(tmp_path).items()} == after
        evicted = [size for name, size in before.items() if name not in after]
        if evicted:  # no more than needed
            assert sum(after.values()) + max(evicted) > budget
            evictions += 1
    assert evictions > 10


def test_the_new_snapshot_is_kept_even_when_it_is_worth_the_least(tmp_path):
    store = KVStore(tmp_path, 1.2 * size_of(800) / 2**20, FP)
    long = tokens(800)
    save(store, long)
    use(store, long)
    new = save(store, tokens(200, seed=1))
    assert snapshot_files(tmp_path) == [new.name]


def test_a_system_prompt_shared_by_conversations_outlives_them(tmp_path):
    """ds4's flaw: with (hits + 1) * tokens / size the short shared prefix goes first."""
    system = tokens(200, seed=99)
    conversations = [tokens(2000, seed=s, prefix=system) for s in range(3)]
    store = KVStore(tmp_path, (size_of(200) + 3 * size_of(2000)) / 2**20, FP)
    system_file = save(store, system).name
    files = []
    for ids in conversations:  # a new conversation starts from the saved system prompt
        assert store.lookup(ids).length == 200
        use(store, ids)
        files.append(save(store, ids).name)
    for ids in conversations:  # and goes on from its own snapshot
        assert store.lookup(ids + [1]).length == 2000
        use(store, ids)
    entries = index(tmp_path)
    ds4_hits = {system_file: 3, **dict.fromkeys(files, 1)}
    ds4_score = {n: (ds4_hits[n] + 1) * e["tokens"] / e["size"] for n, e in entries.items()}
    assert min(ds4_score, key=ds4_score.get) == system_file

    save(store, tokens(2000, seed=50))  # an unrelated session needs room for one file
    kept = snapshot_files(tmp_path)
    assert system_file in kept and files[0] not in kept  # the least recently used conversation went
    assert files[1] in kept and files[2] in kept


def test_of_one_session_s_checkpoints_the_shortest_goes_first(tmp_path):
    session = tokens(1500)
    store = KVStore(tmp_path, (size_of(1000) + 2 * size_of(1500)) / 2**20, FP)
    names = [save(store, session[:n]).name for n in (500, 1000, 1500)]
    use(store, session)  # credits all three
    save(store, tokens(1500, seed=7))
    kept = snapshot_files(tmp_path)
    assert names[0] not in kept and names[1] in kept and names[2] in kept


def test_recency_and_uses_decide_between_equal_snapshots(tmp_path):
    store = KVStore(tmp_path, 3.5 * size_of(500) / 2**20, FP)
    old, recent, used = tokens(500, seed=1), tokens(500, seed=2), tokens(500, seed=3)
    names = {k: save(store, ids).name for k, ids in (("old", old), ("recent", recent), ("used", used))}
    now = index(tmp_path)[names["old"]]["last_used"]
    edit_index(tmp_path, names["old"], last_used=now - HALF_LIFE)
    # used 4 times 2 half-lives ago: decayed to 1.25 uses, more than the fresh snapshot's 1
    edit_index(tmp_path, names["used"], last_used=now - 2 * HALF_LIFE, uses=5.0)
    save(store, tokens(500, seed=4))
    assert names["old"] not in snapshot_files(tmp_path)
    save(store, tokens(500, seed=5))
    assert names["recent"] not in snapshot_files(tmp_path) and names["used"] in snapshot_files(tmp_path)


def test_a_smaller_budget_evicts_when_the_store_opens(tmp_path):
    store = KVStore(tmp_path, 100, FP)
    for seed in range(4):
        save(store, tokens(500, seed=seed))
    KVStore(tmp_path, 2.5 * size_of(500) / 2**20, FP)
    assert len(snapshot_files(tmp_path)) == 2 and len(index(tmp_path)) == 2


# -- fingerprint


def test_the_fingerprint_is_stable_and_tells_models_apart(small_native, small_checkpoint, tmp_path):
    fingerprint = model_fingerprint(small_native)
    script = f"from ds4_mlx.kvstore import model_fingerprint; print(model_fingerprint({str(small_native)!r}))"
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == fingerprint

    convert(small_checkpoint, tmp_path / "bf16", recipe="bf16")
    assert model_fingerprint(tmp_path / "bf16") != fingerprint
    assert model_fingerprint(small_native, {"fp8_activations": True}) != fingerprint

    # another checkpoint of the same shapes: identical config, index and shard headers
    retrained = shutil.copytree(small_native, tmp_path / "retrained")
    for shard in retrained.glob("*.safetensors"):
        data = bytearray(shard.read_bytes())
        start = 8 + struct.unpack_from("<Q", data)[0]
        data[start:] = np.random.default_rng(0).bytes(len(data) - start)
        shard.write_bytes(data)
    assert model_fingerprint(retrained) != fingerprint
