"""Benchmark: llama.cpp's llama_model_quantize (llama-quantize) vs `mt quantize`, side by side in one run.

Converts the Llama-3.2-1B-shaped bf16 checkpoint of bench_convert.py to a BF16 GGUF, then quantizes
it with both tools at the same thread count for each type, printing wall time, peak RSS, the ratio
and whether the files are byte-identical.

    python scripts/bench_quant.py [--types q8_0,q4_k_m,q5_k_m,q6_k] [--threads 2] [--device auto|cpu|cuda] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import build_checkpoint, files_identical, timed  # noqa: E402

LLAMA_QUANTIZE = """
import sys, llama_cpp
from mt.quant.quantize import parse_file_type
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(parse_file_type(sys.argv[3])); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="auto", help="mt quantize --device (auto|cpu|cuda)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    src = work / "llama-3.2-1b-shaped"
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    bf16 = work / "bf16.gguf"
    if not bf16.is_file():
        subprocess.run([sys.executable, "-m", "mt.cli", "convert", str(src), "-o", str(bf16), "--outtype", "bf16", "--quiet"], check=True)
    print(f"{'type':<8} {'tool':<22} {'wall s':>8} {'peak RSS':>10}")
    for qtype in args.types.split(","):
        ref, ours = work / f"ref-{qtype}.gguf", work / f"mt-{qtype}.gguf"
        ref_t, ref_rss = timed([sys.executable, "-c", LLAMA_QUANTIZE, str(bf16), str(ref), qtype, str(args.threads)])
        mt_t, mt_rss = timed([sys.executable, "-m", "mt.cli", "quantize", str(bf16), str(ours), qtype,
                              "--threads", str(args.threads), "--device", args.device, "--force", "--quiet"])
        print(f"{qtype:<8} {'llama-quantize':<22} {ref_t:>8.1f} {ref_rss / 1e9:>8.2f} GB")
        print(f"{qtype:<8} {'mt quantize':<22} {mt_t:>8.1f} {mt_rss / 1e9:>8.2f} GB")
        print(f"{qtype:<8} ratio: mt runs at {ref_t / mt_t:.2f}x llama-quantize's speed, peak RSS {mt_rss / ref_rss:.2f}x; "
              f"files byte-identical: {files_identical(ref, ours)}", flush=True)
        ref.unlink()
        ours.unlink()


if __name__ == "__main__":
    main()
