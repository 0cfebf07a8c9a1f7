"""Quality, size and speed of the quantizing recipes (JSON out).

* tensor: synthetic FP4-like routed-expert matrices (heavy-tailed Student t weights rounded to the
  official FP4 format: e2m1 values times power-of-two scales per 32 inputs) quantized by plain round to
  nearest (`mx.quantize`) and by our error-minimising search, without and with importance weights
  (synthetic per-input-channel activation second moments, log-normal); relative reconstruction error
  sqrt(sum w (x - x')^2 / sum w x^2), uniform (w = 1) and importance-weighted.
* model: a tiny random official-layout model with heavy-tailed experts converted with native, q2 (round
  to nearest / ours / ours with an imatrix collected on other tokens), q4, and native with only the
  embedding and head at 8 bits; KL(native || recipe) of the next-token distributions and top-1 agreement
  over `--positions` random-token positions.
* flash_size: `convert --dry-run` of Flash-sized headers (no data): total bytes and bits per weight by class.
* conversion (with --conversion): time and peak memory of native and q2 conversions, in a fresh process,
  of Flash-shaped data (Flash's embedding, head, attention and 2048 x 4096 experts; 2 layers + MTP of
  16 experts), and from it an estimate of the q2 conversion time of the real Flash on this machine.

    python benchmarks/quant_quality.py [--positions 384] [--conversion]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from official_checkpoint import FLASH_CONFIG, quantize_fp4, write_official_checkpoint, write_official_headers  # noqa: E402

from ds4_mlx import load_model  # noqa: E402
from ds4_mlx.convert import RECIPES, convert, dry_run  # noqa: E402
from ds4_mlx.convert import imatrix as imx  # noqa: E402
from ds4_mlx.convert.quantize import affine_quantize  # noqa: E402
from ds4_mlx.convert.plan import plan_steps  # noqa: E402
from ds4_mlx.convert.recipes import GROUP_SIZE, recipe_targets  # noqa: E402
from ds4_mlx.convert.safetensors_reader import Checkpoint  # noqa: E402

# Tiny model: official-b's dims (all multiples of 128), 8 experts of which 2 per token, 4 layers.
TINY = {"num_hidden_layers": 4, "num_hash_layers": 1, "compress_ratios": [0, 4, 128, 0, 0],
        "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1024}
# Flash with 2 layers (a hash-routed window layer, a CSA layer) + MTP, 16 experts each.
SPEED = {**FLASH_CONFIG, "num_hidden_layers": 2, "n_routed_experts": 16, "compress_ratios": [0, 4, 0]}


def fp4_like(rows: int, cols: int, rng) -> np.ndarray:
    w = rng.standard_t(4, (rows, cols)) / np.sqrt(2 * cols)
    return quantize_fp4(w)[2].astype(np.float32)


def rel_error(x: mx.array, y: mx.array, w=None) -> float:
    w = 1.0 if w is None else w
    return round(mx.sqrt(mx.sum(w * (x - y) ** 2) / mx.sum(w * x * x)).item(), 4)


def dequant(packed, group_size, bits) -> mx.array:
    w, s, b = packed
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)


def tensor_errors(n: int = 4, shape=(1024, 4096), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mats = [mx.array(fp4_like(*shape, rng)) for _ in range(n)]
    importance = [mx.array(rng.lognormal(0, 1, shape[1]).astype(np.float32)) for _ in range(n)]
    out = {}
    for bits in (2, 4):
        for gs in (64, 128):
            methods = {
                "rtn": lambda x, imp: mx.quantize(x.astype(mx.bfloat16), group_size=gs, bits=bits),
                "ours": lambda x, imp: affine_quantize(x, gs, bits),
                "ours_importance": lambda x, imp: affine_quantize(x, gs, bits, imp),
            }
            row = {}
            for name, fn in methods.items():
                errs = [(rel_error(x, y := dequant(fn(x, imp), gs, bits)), rel_error(x, y, imp))
                        for x, imp in zip(mats, importance)]
                row[name] = {"uniform": round(float(np.mean([e[0] for e in errs])), 4),
                             "importance_weighted": round(float(np.mean([e[1] for e in errs])), 4)}
            out[f"{bits}bit_g{gs}"] = row
    return out


def rtn(recipe: str, group, group_size=None):
    """The target of `recipe`, quantized by plain round to nearest."""
    target = RECIPES[recipe](group, group_size or GROUP_SIZE[recipe])
    return {**target, "rtn": True} if isinstance(target, dict) else target


def head_embed_only(group, group_size=None):
    return {"group_size": 64, "bits": 8, "mode": "affine"} if group.role in ("embed", "head") else None


def log_probs(path: Path, ids: mx.array) -> mx.array:
    model = load_model(path)
    model.set_dtype(mx.float32)
    logits = mx.concatenate([model(row[None]) for row in ids], axis=1)[0]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def model_quality(tmp: Path, positions: int, seed: int = 0) -> dict:
    ckpt = write_official_checkpoint(tmp / "ckpt", TINY, seed=seed, n_shards=2, heavy_tailed=True)
    rng = np.random.default_rng(seed + 1)
    length = 128
    ids = mx.array(rng.integers(2, TINY["vocab_size"], (max(1, positions // length), length)), dtype=mx.int32)
    calibration = [list(map(int, rng.integers(2, TINY["vocab_size"], 512))) for _ in range(4)]
    extra = {"q2_rtn": partial(rtn, "q2"), "q4_rtn": partial(rtn, "q4"),
             "head_embed_8bit": head_embed_only}
    RECIPES.update(extra)
    try:
        runs = {"native": {}, "head_embed_8bit": {}, "q2_rtn": {}, "q2": {}, "q2_imatrix": {}, "q4_rtn": {}, "q4": {}}
        convert(ckpt, tmp / "native", "native")
        stats, tokens = imx.collect(load_model(tmp / "native"), calibration)
        imx.save(tmp / "imatrix.safetensors", stats, tokens)
        for name in runs:
            if name == "native":
                continue
            recipe, imatrix = ("q2", tmp / "imatrix.safetensors") if name == "q2_imatrix" else (name, None)
            convert(ckpt, tmp / name, recipe, imatrix=imatrix)
        reference = log_probs(tmp / "native", ids)
        p = mx.exp(reference)
        result = {}
        for name in runs:
            lp = log_probs(tmp / name, ids)
            kl = mx.sum(p * (reference - lp), axis=-1)
            result[name] = {"kl_mean": round(mx.mean(kl).item(), 5), "kl_p90": round(float(np.percentile(np.array(kl), 90)), 5),
                            "top1_agreement": round(mx.mean(mx.argmax(lp, -1) == mx.argmax(reference, -1)).item(), 4)}
        return {"config": TINY, "positions": int(ids.size), "calibration_tokens": tokens, "recipes": result}
    finally:
        for name in extra:
            RECIPES.pop(name)


def flash_size(tmp: Path) -> dict:
    headers = write_official_headers(tmp / "flash", FLASH_CONFIG)
    out = {}
    for recipe in ("native", "q2", "q4"):
        s = dry_run(headers, recipe)
        out[recipe] = {"total_bytes": s["total_bytes"], "total_GiB": round(s["total_bytes"] / 2**30, 2),
                       "main_bytes": s["main_bytes"], "main_GiB": round(s["main_bytes"] / 2**30, 2),
                       "bits_per_weight": {k: c["bits_per_weight"] for k, c in s["classes"].items()}}
    out["ds4_q2_gguf_GiB"] = 80.76  # antirez/ds4's q2 GGUF, main model only (its MTP is a separate file)
    return out


def quantized_params(headers: Path, recipe: str) -> int:
    steps = plan_steps(Checkpoint(headers), recipe_targets(recipe))
    return sum(s.params for s in steps if isinstance(s.target, dict))


def conversion(tmp: Path) -> dict:
    """Convert (native, q2) Flash-shaped data in a fresh process: Flash's embedding, head, attention and
    expert matrices, 2 layers + MTP of 16 experts each. The data are zeros of sparse files (the work does
    not depend on the values; no disk reads), so the time is the conversion's own; the Flash estimate
    scales it by the number of quantized parameters."""
    headers = write_official_headers(tmp / "flash_small", SPEED, n_shards=4)
    code = ("import json, sys; from ds4_mlx.convert import convert; s = convert(*sys.argv[1:4]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')] if sys.platform == 'linux' else []; "
            "s['max_rss_bytes'] = int(hwm[0].split()[1]) * 1024 if hwm else s['max_rss_bytes']; print(json.dumps(s))")
    out = {"config": SPEED, "source_bytes": sum(f.stat().st_size for f in headers.glob("*.safetensors"))}
    for recipe in ("native", "q2"):
        proc = subprocess.run([sys.executable, "-c", code, str(headers), str(tmp / f"speed_{recipe}"), recipe],
                              capture_output=True, text=True, check=True)
        s = json.loads(proc.stdout.strip().splitlines()[-1])
        out[recipe] = {k: s[k] for k in ("seconds", "seconds_per_source_gb", "peak_mlx_bytes", "max_rss_bytes", "total_bytes")}
    params = quantized_params(headers, "q2")
    rate = params / (out["q2"]["seconds"] - out["native"]["seconds"])
    flash = quantized_params(write_official_headers(tmp / "flash", FLASH_CONFIG), "q2")
    out.update(q2_quantized_params=params, q2_params_per_second=round(rate), flash_q2_quantized_params=flash,
               flash_q2_estimated_hours=round(flash / rate / 3600, 2))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=384)
    parser.add_argument("--conversion", action="store_true", help="also measure conversion speed and memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"tensor": tensor_errors(), "model": model_quality(tmp, args.positions), "flash_size": flash_size(tmp)}
        if args.conversion:
            result["conversion"] = conversion(tmp)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
