"""Micro-benchmark: one big float32 tensor quantized on one thread by ggml (ggml_quantize_chunk via ctypes),
mt's compiled kernel and mt's numpy reference, alternating in one process, best of several repeats.

    python scripts/bench_kernels.py [--types q4_k,q5_k,q6_k,q8_0] [--rows 8192] [--cols 2048] [--repeats 3] [--numpy]
                                    [--imatrix]  (with importance weights: ggml's quantize_row_*_impl paths)

Prints seconds and each mt path's speed relative to ggml (>1: faster than ggml), and checks the bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mt.quant.types import quant_type, set_threads  # noqa: E402
from mt.quant.weighted import quantize_weighted  # noqa: E402
from tests.ggml_ref import ggml_quantize  # noqa: E402


def best_time(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="q4_k,q5_k,q6_k,q8_0")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy", action="store_true", help="also time the numpy references (slow)")
    parser.add_argument("--imatrix", action="store_true", help="quantize with importance weights (chi-squared, like an imatrix)")
    args = parser.parse_args()
    set_threads(1)
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32) * np.float32(0.02)
    qw = (np.random.default_rng(1).standard_normal(args.cols) ** 2).astype(np.float32) if args.imatrix else None
    backends = ["compiled", "numpy"] if args.numpy else ["compiled"]
    for name in args.types.split(","):
        qt = quant_type(GGMLQuantizationType[name.upper()])

        def mt_quantize(rows: np.ndarray, backend: str) -> np.ndarray:
            if qw is None:
                return qt.quantize(rows, backend=backend)
            return quantize_weighted(qt.ggml_type, rows, qw, backend=backend)

        mt_quantize(x[:1], "compiled")  # compile (or load the cache) outside the timing
        timings = {b: [] for b in ["ggml", *backends]}
        same = True
        for _ in range(args.repeats):  # alternate so that a busy machine slows every path alike
            t, ref = best_time(lambda: ggml_quantize(int(qt.ggml_type), x, qw), 1)
            timings["ggml"].append(t)
            for b in backends:
                t, ours = best_time(lambda: mt_quantize(x, b), 1)
                timings[b].append(t)
                same &= np.array_equal(ours.reshape(ref.shape), ref)
        ggml_s = min(timings["ggml"])
        report = "  ".join(f"{b} {min(timings[b]):.3f}s ({ggml_s / min(timings[b]):.2f}x)" for b in backends)
        print(f"{name:<5} ggml {ggml_s:.3f}s  {report}  bytes equal: {same}", flush=True)


if __name__ == "__main__":
    main()
