"""How close our logits are to DeepSeek's official code on tests/data/official-b (JSON out).

Converts the tiny official-format checkpoint with the native recipe, then compares against the
official vectors: bf16 mode (plain bf16 linears) and the FP8 path (FP8 activations before every
FP8/FP4 linear), with and without our `fp8_activations` simulation.

    python benchmarks/official_match.py [--lengths 42 299]
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ds4_mlx import load_model
from ds4_mlx.convert import convert

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "official-b"


def stats(ours, reference):
    delta = np.abs(ours - reference).max(-1)
    return {"median": round(float(np.median(delta)), 4), "p90": round(float(np.percentile(delta, 90)), 4),
            "max": round(float(delta.max()), 4),
            "argmax_agreement": round(float((ours.argmax(-1) == reference.argmax(-1)).mean()), 4)}


def decode(model, ids):
    """Prefill 5 tokens then one per call (the official generate.py path); rows = positions 4.."""
    cache = model.make_cache()
    rows = [model(ids[:, :5], cache)[:, -1:]]
    rows += [model(ids[:, p : p + 1], cache) for p in range(5, ids.shape[1])]
    return np.array(mx.concatenate(rows, axis=1))[0]


def measure(model, vectors, lengths):
    result = {}
    for length in lengths:
        ids = mx.array(vectors[f"ids_L{length}"])[None]
        prefill = np.array(model(ids))[0]
        decoded = decode(model, ids)
        entry = {
            "prefill_last_vs_bf16_mode": round(float(np.abs(prefill[-1] - vectors[f"bf16mode_prefill_last_logits_L{length}"]).max()), 4),
            "decode_vs_fp8_path": stats(decoded, vectors[f"decode_logits_L{length}"]),
        }
        if f"bf16mode_decode_logits_L{length}" in vectors:
            entry["decode_vs_bf16_mode"] = stats(decoded, vectors[f"bf16mode_decode_logits_L{length}"])
        result[f"L{length}"] = entry
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[42, 299])
    args = parser.parse_args()
    vectors = np.load(DATA / "vectors.npz")
    with tempfile.TemporaryDirectory() as tmp:
        convert(DATA / "checkpoint", Path(tmp) / "native", recipe="native")
        report = {"device": str(mx.default_device()), "checkpoint": "tests/data/official-b", "recipe": "native"}
        for fp8_activations in (False, True):
            model = load_model(Path(tmp) / "native", model_config={"fp8_activations": fp8_activations})
            report[f"fp8_activations={fp8_activations}"] = measure(model, vectors, args.lengths)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
