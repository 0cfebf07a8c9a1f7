"""Disk cost and speed of KV snapshots (ds4_mlx.kvstore) for the Flash config; no weights needed.

Fills Flash-shaped caches with random rows of the shapes and dtypes a real session has at each
context (bf16 window rings and compressed rows, fp32 compressor states, the offset), saves them
with KVStore and prints JSON: file sizes, bytes per token of context (the slope between the two
contexts) and the fixed part, and for the longest context the time to save (including fsync)
and to restore (lookup + load + evaluate the caches) with the file in the page cache (warm) and
after dropping its pages with posix_fadvise(DONTNEED) (cold; the file was fsynced, so its pages
are clean and the kernel drops them).

    python benchmarks/kvstore_io.py [--contexts 4096 32768] [--repeats 3] [--dir DIR]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import mlx.core as mx
import numpy as np

from ds4_mlx.cache import cache_nbytes, restore, snapshot
from ds4_mlx.config import ModelArgs
from ds4_mlx.kvstore import KVStore

FLASH = {"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}


def synthetic_session(args: ModelArgs, context: int, seed: int = 0):
    """(caches, next-token logits [vocab] fp32) as a session of `context` tokens would hold them,
    filled with random values."""
    mx.random.seed(seed)

    def rows(count, width, dtype=mx.bfloat16):
        return mx.random.normal((1, count, width)).astype(dtype)

    states = []
    for layer_id in range(args.num_hidden_layers):
        ratio = args.compress_ratio(layer_id)
        state = [mx.array(context), [rows(args.sliding_window, args.head_dim)]]
        if ratio:
            coff = 2 if ratio == 4 else 1
            widths = [args.head_dim] + ([args.index_head_dim] if ratio == 4 else [])
            for width in widths:  # the compressor's rolling kv and score, then its output rows
                state.append([rows(coff * ratio, coff * width, mx.float32) for _ in range(2)])
                state.append([rows(context // ratio, width)] if context >= ratio else [])
        states.append(state)
    caches = restore(args, states)
    logits = mx.random.normal((args.vocab_size,))
    mx.eval([c.arrays() for c in caches], logits)
    return caches, logits


def drop_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def restore_session(store, tokens, args):
    session = store.load(store.lookup(tokens), args)
    mx.eval([c.arrays() for c in session.caches], session.logits)
    return session


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs=2, default=[4096, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="snapshot directory (default: a new one under the temp dir)")
    opts = parser.parse_args()

    if opts.dir:
        run(opts, opts.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="kvstore-io-") as directory:
            run(opts, directory)


def run(opts, directory):
    args = ModelArgs(**FLASH)
    store = KVStore(directory, space_mb=64 << 10, fingerprint="kvstore-io benchmark")
    rng = np.random.default_rng(0)
    result = {"config": "Flash", "directory": directory, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "contexts": {}}
    for context in opts.contexts:
        caches, logits = synthetic_session(args, context)
        nbytes = sum(c.nbytes for c in caches)
        assert nbytes == cache_nbytes(args, context), (nbytes, cache_nbytes(args, context))
        tokens = rng.integers(0, args.vocab_size, context).tolist()
        saves, warm, cold = [], [], []
        for _ in range(opts.repeats):
            path, seconds = timed(lambda: store.save(tokens, caches, logits))
            saves.append(seconds)
            warm.append(timed(lambda: restore_session(store, tokens, args))[1])
            drop_page_cache(path)
            session, seconds = timed(lambda: restore_session(store, tokens, args))
            cold.append(seconds)
        pairs = zip(_leaves(snapshot(session.caches)), _leaves(snapshot(caches)))
        assert all(a.dtype == b.dtype and mx.array_equal(a, b).item() for a, b in pairs)
        size = path.stat().st_size
        result["contexts"][context] = {
            "file_bytes": size,
            "cache_nbytes": nbytes,
            "save_s": statistics.median(saves),
            "restore_warm_s": statistics.median(warm),
            "restore_cold_s": statistics.median(cold),
            "save_gb_per_s": size / statistics.median(saves) / 1e9,
            "restore_cold_gb_per_s": size / statistics.median(cold) / 1e9,
            "all_s": {"save": saves, "restore_warm": warm, "restore_cold": cold},
        }
        del caches, session
    small, large = (result["contexts"][c]["file_bytes"] for c in opts.contexts)
    per_token = (large - small) / (opts.contexts[1] - opts.contexts[0])
    result["bytes_per_token"] = per_token
    result["fixed_bytes"] = small - per_token * opts.contexts[0]
    result["cache_bytes_per_token"] = (cache_nbytes(args, opts.contexts[1]) - cache_nbytes(args, opts.contexts[0])) / (
        opts.contexts[1] - opts.contexts[0]
    )
    print(json.dumps(result, indent=2))


def _leaves(state):
    for item in state:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


if __name__ == "__main__":
    main()
