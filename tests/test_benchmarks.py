"""The speed benchmarks (benchmarks/decode.py, prefill.py, sweep.py and their helpers in flash.py) run
end to end on a tiny config and report sane figures; the Flash byte counts match the spec."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from ds4_mlx.cache import cache_nbytes, restore
from ds4_mlx.custom_kernels import backend
from ds4_mlx.layers import linear

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import flash  # noqa: E402


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--tiny", "--layers", "4", "--recipe", "q2"]


def test_layer_mix():
    full = flash.full_args()
    assert flash.kind_counts(full) == {"window": 2, "csa": 21, "hca": 20}
    mixed = flash.bench_args(full, 43, "mixed")
    assert flash.kind_counts(mixed) == flash.kind_counts(full) and mixed.num_hash_layers == 3
    eight = flash.bench_args(full, 8, "mixed")
    assert flash.kind_counts(eight) == {"window": 1, "csa": 4, "hca": 3} and eight.num_hash_layers == 1
    first = flash.bench_args(full, 8, "first")
    assert first.compress_ratios == [0, 0, 4, 128, 4, 128, 4, 128] and first.num_hash_layers == 3


def test_flash_bytes_match_the_spec():
    """Per-token weight bytes and resident sizes of the full model (built lazily: nothing evaluated)
    against ../shared/spec/ds4-flash.md section 4 and the checkpoint size of section 5."""
    full = flash.full_args()
    q2 = flash.full_weight_bytes(full, "q2")
    assert 9.0e9 < q2["total"] < 9.6e9  # spec: 9.38 GB (2-bit g64 experts) .. 9.56 GB (ds4 q2)
    assert 85e9 < q2["resident"] < 88e9  # routed experts 2.25 bits, the rest mxfp8, embed/head 8-bit
    native = flash.full_weight_bytes(full, "native")
    assert 155e9 < native["resident"] < 157e9  # the checkpoint's main model: 156.0 GB
    bf16 = flash.full_weight_bytes(full, "bf16")
    assert 26.4e9 < bf16["total"] < 26.8e9  # spec: 26.54 GB
    kv = flash.kv_read_bytes(full, 1 << 20)
    assert kv["index_keys"] == 21 * (1 << 18) * 128 * 2  # 1,344 B per context token (spec section 3)


def test_filled_caches_hold_what_a_session_holds():
    args = flash.bench_args(flash.full_args(flash.TINY), 4)
    model = flash.build_model(args, "q2")
    for context in (10, 130, 300):
        caches = flash.fresh_caches(model, context)
        assert sum(c.nbytes for c in caches) == cache_nbytes(args, context)
        assert all(c.offset == context for c in caches)
        stats = flash.check_logits(model, caches)
        assert stats["finite"] and 0.1 < stats["std"] < 10


def test_chunk_parts_restore_the_caches():
    """flash.layer_parts on a prefill chunk: every rep sees the context the chunk started from (the caches
    end one chunk further on, not one per call), and the block equals the layer run on that context."""
    args = flash.bench_args(flash.full_args(flash.TINY), 3)
    model = flash.build_model(args, "q2")
    caches = flash.fresh_caches(model, 100)
    before = [c.state for c in caches]
    rows = flash.layer_parts(model, caches, reps=2, length=24)
    assert all(c.offset == 124 for c in caches) and [r["kind"] for r in rows] == ["window", "csa", "hca"]
    assert all(r[p] > 0 for r in rows for p in ("attention", "moe", "mhc", "block"))
    assert rows[0]["indexer"] == 0 < rows[1]["indexer"]
    reference = restore(args, before)
    ids = (7 + mx.arange(24, dtype=mx.int32)[None]) % args.vocab_size
    model.hidden(ids, reference)
    for ours, theirs in zip(caches, reference):
        assert all(mx.array_equal(a, b).item() for a, b in zip(ours.arrays(), theirs.arrays()))


@pytest.mark.parametrize("recipe", ["q2", "q4", "native"])
def test_recipe_layouts(recipe):
    args = flash.bench_args(flash.full_args(flash.TINY), 2)
    assert args.compress_ratios[:2] == [4, 128]
    model = flash.build_model(args, recipe)
    layer = model.layers[0]  # CSA
    experts = layer.ffn.experts.w1
    expected = {"q2": (2, 128, "affine"), "q4": (4, 64, "affine"), "native": (4, 32, "mxfp4")}[recipe]
    assert (experts.bits, experts.group_size, experts.mode) == expected
    attn = layer.attn
    for m in (attn.wq_a, attn.wq_b, attn.wkv, attn.wo_a, attn.wo_b, attn.indexer.wq_b, layer.ffn.shared_experts.w2):
        assert (m.bits, m.mode) == (8, "mxfp8")
    assert attn.compressor.wkv.weight.dtype == mx.bfloat16 and attn.indexer.weights_proj.weight.dtype == mx.bfloat16
    if recipe == "native":
        assert model.embed.weight.dtype == mx.bfloat16 and model.head.weight.dtype == mx.bfloat16
    else:
        assert (model.embed.bits, model.embed.group_size, model.head.bits) == (8, 64, 8)
    assert layer.hc_attn.fn.dtype == mx.float32 and layer.ffn.gate.weight.dtype == mx.bfloat16
    assert flash.check_logits(model, flash.fresh_caches(model, 40))["finite"]


def test_decode(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DS4_TEST_MARK", "64")  # MLX_* variables are recorded with the device (MLX reads not this)
    out = tmp_path / "decode.json"
    r = load("decode").main(TINY + ["--contexts", "40,300", "--tokens", "6", "--warmup", "2", "--part-reps", "2",
                                    "--bandwidth", "1e11", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "decode"
    assert backend.enabled()  # restored
    assert r["config"]["kinds"] == {"window": 1, "csa": 2, "hca": 1} and r["config"]["compiled_decode"] is True
    assert r["device"]["bandwidth_bytes_per_s"] == 1e11 and r["device"]["mlx_env"]["MLX_DS4_TEST_MARK"] == "64"
    assert set(r["results"]) == {"40", "300"}
    for context, entry in r["results"].items():
        assert set(entry) == {"on", "off", "speedup"} and entry["speedup"]["step"] > 0
        for mode in ("on", "off"):
            m = entry[mode]
            assert m["tokens_per_s"] > 0 and m["step_ms"] > 0 and m["layer_ms"] > 0 and m["head_ms"] > 0
            assert m["context_end"] > m["context"] == int(context)
            full = m["full_depth"]
            assert 0 < full["tokens_per_s_simple"] < m["tokens_per_s"]  # 6 layers are slower than 4
            assert 0 < full["tokens_per_s_by_kind"] < m["tokens_per_s"]
            parts = m["parts_ms"]
            assert set(parts) == set(flash.PARTS) and all(v >= 0 for v in parts.values())
            assert parts["attention"] > 0 and parts["moe"] > 0 and parts["mhc"] > 0 and parts["indexer"] > 0
            assert 0.5 < m["parts_sum_ms"] / m["block_ms"] < 3  # isolated parts vs the isolated block
            assert math.isclose(sum(m["parts_scaled_ms"].values()), m["layer_ms"], rel_tol=1e-6)
            for row in m["per_layer"]:
                assert (row["indexer"] > 0) == (row["kind"] == "csa")
            b = m["bytes_per_token"]
            assert b["total"] == b["weights"] + b["kv"] and b["full_depth_total"] > b["total"]
            assert 0 < m["bandwidth"]["fraction_of_ceiling"] and m["bandwidth"]["full_depth_ceiling_tokens_per_s"] > 0
            assert m["logits"]["finite"]
    w = r["weights_per_token"]
    assert 0 < w["model"] < r["memory"]["weights_resident_bytes"] and w["full_depth"] > w["model"]


def test_shared_weights_alias_layers_of_one_kind():
    """--shared-weights: layers of one kind (ratio, hash routing) hold the same arrays; resident bytes
    count them once, the bytes a token reads count every layer."""
    args = flash.bench_args(flash.full_args(flash.parse_overrides(True, None)), 6, "first")
    shared = flash.build_model(args, "q2", materialize=False, shared=True)
    own = flash.build_model(args, "q2", materialize=False)
    assert args.compress_ratios[:6] == [0, 4, 128, 4, 128, 4] and args.num_hash_layers == 1
    layers = shared.layers
    same = lambda a, b: mx.array_equal(a, b).item()  # noqa: E731
    assert same(layers[1].attn.wq_a.weight, layers[5].attn.wq_a.weight)  # CSA
    assert same(layers[2].ffn.gate.weight, layers[4].ffn.gate.weight)  # HCA
    assert "tid2eid" in layers[0].ffn.gate and "tid2eid" not in layers[1].ffn.gate  # layer 0: hash-routed kind
    assert not same(own.layers[3].attn.wq_a.weight, own.layers[5].attn.wq_a.weight)
    assert flash.weight_bytes(shared) < flash.weight_bytes(own)
    assert flash.weight_bytes_per_token(shared)["total"] == flash.weight_bytes_per_token(own)["total"]


def test_decode_host_split_and_compiled_ab():
    from ds4_mlx.layers import compiled

    r = load("decode").main(TINY + ["--layers", "6", "--layer-mix", "first", "--shared-weights", "--contexts", "40",
                                    "--tokens", "2", "--warmup", "1", "--part-reps", "0", "--kernels", "on",
                                    "--compiled-ab"])
    assert r["config"]["shared_weights"] and compiled.enabled()  # restored
    entry = r["results"]["40"]
    assert set(entry) == {"on", "on_eager", "compiled_speedup"} and entry["compiled_speedup"] > 0
    for mode in ("on", "on_eager"):
        split = entry[mode]["host_split"]
        assert split["ms"]["build"] > 0 and split["ms"]["encode"] > 0 and split["ms"]["gpu_tail"] >= 0
        ops = split["ops"]
        assert ops["launching"] > 0 and ops["total"] == ops["launching"] + ops["views"]


def test_prefill():
    r = load("prefill").main(TINY + ["--lengths", "150", "--chunk", "64", "--kernels", "both"])
    entry = r["results"]["150"]
    assert entry["speedup"]["total"] > 0
    for mode in ("on", "off"):
        m = entry[mode]
        assert m["tokens_per_s"] > 0 and len(m["chunks"]) == 3 and sum(c["tokens"] for c in m["chunks"]) == 150
        assert math.isclose(sum(m["layer_s"]) + m["head_s"], m["seconds"], rel_tol=1e-9)
        assert 0 < m["full_depth"]["tokens_per_s_by_kind"] < m["tokens_per_s"]
        assert set(m["layer_s_by_kind"]) == {"window", "csa", "hca"} and m["weight_tflops"] > 0
        assert set(m["parts_ms"]) == {"attention", "indexer", "moe", "mhc", "rest"} and m["block_ms"] > 0
        assert m["parts_ms_by_kind"]["indexer"]["window"] == 0 < m["parts_ms_by_kind"]["indexer"]["csa"]
        assert m["parts_chunk"] == 64 and m["parts_context"] == 150


def test_sweep(tmp_path):
    path = tmp_path / "sweep.csv"
    r = load("sweep").main(TINY + ["--start", "32", "--max-context", "100", "--chunk", "32", "--gen-tokens", "3",
                                   "--kernels", "off", "--csv", str(path), "--png", str(tmp_path / "sweep.png")])
    assert [row["frontier"] for row in r["rows"]] == [32, 64, 100]
    for row in r["rows"]:
        assert row["gen_tps"] > 0 and 0 < row["gen_tps_full_depth"] < row["gen_tps"]
        assert row["prefill_tps"] > 0 and row["context"] == row["frontier"]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[-1]["gen_tps"]) > 0
    assert (r["png"] is None) == (importlib.util.find_spec("matplotlib") is None)
    if r["png"] is not None:
        assert Path(r["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_count():
    """The reference path's graph per decode step: the mHC Sinkhorn iterations alone are hundreds of
    element-wise ops per layer (the custom kernels replace them on a GPU)."""
    r = load("op_count").main(["--tiny", "--layers", "3", "--context", "300", "--kernels", "off"])
    layers = r["results"]["off"]["per_layer"]
    assert [row["kind"] for row in layers] == ["window", "csa", "hca"]
    for row in layers:
        assert row["launching"] + row["views"] == row["total"] and row["launching"] > 300
        assert row["by_primitive"]["QuantizedMatmul"] >= 4 and row["build_ms"] > 0
    top_k = [row["by_primitive"].get("ArgPartition", 0) for row in layers]
    assert top_k == [0, 2, 1]  # the MoE gate's (layer 0 routes by hash) and the CSA indexer's
    full = flash.full_args(flash.parse_overrides(True, None))
    per_kind = {row["kind"]: row["launching"] for row in layers}
    expected = sum(per_kind[flash.KINDS[full.compress_ratio(i)]] for i in range(full.num_hidden_layers))
    assert r["results"]["off"]["full_depth_launching"] == expected + r["results"]["off"]["head"]["launching"]


def test_op_count_with_stubbed_kernels():
    """The kernels-on decode graph counted without a GPU (placeholder kernels, compiled decode graphs, the linear
    layers without the CPU's fp32 casts): a regression guard on what sets decode speed (decode is host-bound: each
    launching op costs ~10-15 us on an H100 host). Counted 2026-12-08 on this tiny config: window 30, CSA 47, HCA 30
    launching ops, of them 17 / 23 / 19 kernels (the MoE's routed and shared experts in the same two launches; the
    step's positions made once for all layers). Earlier counts this way have matched the tiny config's at Flash
    dimensions, and an H100's count of the same code less a few ops (78 / 118 / 88 vs 73 / 111 / 83 on 2026-11-27,
    when the CPU graphs still had the linear layers' casts)."""
    launch, backend_of, exact = backend.Kernel.launch, backend.backend, linear._exact
    r = load("op_count").main(["--tiny", "--layers", "3", "--context", "300", "--kernels", "on", "--stub-kernels"])
    assert (backend.Kernel.launch, backend.backend) == (launch, backend_of)  # restored
    assert linear._exact is exact
    layers = r["results"]["on"]["per_layer"]
    assert [row["kind"] for row in layers] == ["window", "csa", "hca"]
    assert [row["by_primitive"]["Depends"] for row in layers] == [17, 23, 19]
    for row, most in zip(layers, (30, 47, 30)):
        assert row["launching"] <= most, (row["kind"], row["launching"], row["by_primitive"])


def test_moe_prefill_benchmark():
    r = load("moe_prefill").main(["--tiny", "--recipes", "q2,native", "--tokens", "40", "--reps", "1"])
    assert [row["recipe"] for row in r["results"]] == ["q2", "native"]
    for row in r["results"]:
        assert row["reference_ms"] > 0 and row["wrapper_ms"] > 0 and row["relative_l2"] < 1e-2
    assert [row["format"]["mode"] for row in r["results"]] == ["affine", "mxfp4"]


@pytest.mark.parametrize("script", ["decode", "prefill", "sweep", "op_count"])
def test_help(script):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "--recipe" in out.stdout and "--kernels" in out.stdout
