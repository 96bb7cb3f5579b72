"""Benchmark: llama.cpp's llama_model_quantize (llama-quantize) vs `mt quantize`, side by side in one run.

Converts the Llama-3.2-1B-shaped bf16 checkpoint of bench_convert.py to a BF16 GGUF, then quantizes
it with both tools at the same thread count for each type, printing wall time, peak RSS, the ratio
and whether the files are byte-identical. The types named by --imatrix-types (and those llama.cpp refuses without
one) get the same importance matrix in both tools: random chi-square weights for every matrix, written once as an
imatrix GGUF (a real one only changes the weights, not the work).

    python scripts/bench_quant.py [--types q8_0,q4_k_m,iq2_xs] [--threads 2] [--device auto|cpu|cuda] [--workdir DIR]
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
import sys
from pathlib import Path
from mt.quant.imatrix import load_imatrix, output_keys
from mt.quant.quantize import parse_file_type
from tests.llama_quantize import llama_quantize
imx = load_imatrix(Path(sys.argv[5])) if len(sys.argv) > 5 else None  # quantize.cpp reads the file in its time too
kv = [(k, v.decode() if isinstance(v, bytes) else v) for k, _, v in output_keys(imx, sys.argv[5])] if imx else None  # the quantize.imatrix.* keys it adds
llama_quantize(Path(sys.argv[1]), Path(sys.argv[2]), parse_file_type(sys.argv[3]), int(sys.argv[4]),
               imatrix=imx.entries if imx else None, kv_overrides=kv)
"""
NEEDS_IMATRIX = {"q2_k_s", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs"}


def write_random_imatrix(gguf_path: Path, out: Path) -> Path:
    """An imatrix GGUF with chi-square weights for every matrix llama-imatrix would see (all but token_embd)."""
    from mt.io.gguf_in import read_header
    from tests.imatrix_files import random_imatrix, write_gguf

    shapes = {t.name: (1, t.shape[0]) for t in read_header(gguf_path).tensors
              if len(t.shape) >= 2 and t.name != "token_embd.weight"}
    return write_gguf(random_imatrix(shapes, seed=0), out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="auto", help="mt quantize --device (auto|cpu|cuda)")
    parser.add_argument("--imatrix-types", default="", help="more types to quantize with the importance matrix")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    src = work / "llama-3.2-1b-shaped"
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    bf16 = work / "bf16.gguf"
    if not bf16.is_file():
        subprocess.run([sys.executable, "-m", "mt.cli", "convert", str(src), "-o", str(bf16), "--outtype", "bf16", "--quiet"], check=True)
    weighted = NEEDS_IMATRIX | set(filter(None, args.imatrix_types.split(",")))
    imatrix = write_random_imatrix(bf16, work / "imatrix.gguf") if weighted & set(args.types.split(",")) else None
    print(f"{'type':<8} {'tool':<22} {'wall s':>8} {'peak RSS':>10}")
    for qtype in args.types.split(","):
        ref, ours = work / f"ref-{qtype}.gguf", work / f"mt-{qtype}.gguf"
        with_imatrix = [str(imatrix)] if qtype in weighted else []
        ref_t, ref_rss = timed([sys.executable, "-c", LLAMA_QUANTIZE, str(bf16), str(ref), qtype, str(args.threads),
                                *with_imatrix], cwd=ROOT)
        mt_t, mt_rss = timed([sys.executable, "-m", "mt.cli", "quantize", str(bf16), str(ours), qtype,
                              "--threads", str(args.threads), "--device", args.device, "--force", "--quiet",
                              *(["--imatrix", str(imatrix)] if with_imatrix else [])])
        if with_imatrix:
            print(f"{qtype:<8} (both with the importance matrix {imatrix})")
        print(f"{qtype:<8} {'llama-quantize':<22} {ref_t:>8.1f} {ref_rss / 1e9:>8.2f} GB")
        print(f"{qtype:<8} {'mt quantize':<22} {mt_t:>8.1f} {mt_rss / 1e9:>8.2f} GB")
        print(f"{qtype:<8} ratio: mt runs at {ref_t / mt_t:.2f}x llama-quantize's speed, peak RSS {mt_rss / ref_rss:.2f}x; "
              f"files byte-identical: {files_identical(ref, ours)}", flush=True)
        ref.unlink()
        ours.unlink()


if __name__ == "__main__":
    main()
