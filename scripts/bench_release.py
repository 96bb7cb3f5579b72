"""Benchmark: `mt release --no-verify` vs the flow users run today, side by side in one run.

The flow today: llama.cpp's convert_hf_to_gguf.py --outtype bf16, then llama-quantize (llama_model_quantize) once per
type. mt: one `mt release` writing every type from one read of the source. Both on the Llama-3.2-1B-shaped bf16
checkpoint of bench_convert.py, 2 threads. Prints wall time, peak RSS and the ratios.

    python scripts/bench_release.py [--types q8_0,q6_k,q5_k_m,q4_k_m] [--threads 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import build_checkpoint, timed  # noqa: E402
from scripts.bench_quant import LLAMA_QUANTIZE  # noqa: E402
from tests.oracle import sdist_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--types", default="q8_0,q6_k,q5_k_m,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    src = work / "llama-3.2-1b-shaped"
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    types = args.types.split(",")
    converter = sdist_dir() / "convert_hf_to_gguf.py"
    bf16 = work / "flow-bf16.gguf"
    steps = [("convert_hf_to_gguf.py bf16", timed([sys.executable, str(converter), str(src), "--outfile", str(bf16),
                                                    "--outtype", "bf16"], cwd=converter.parent))]
    for qtype in types:
        out = work / f"flow-{qtype}.gguf"
        steps.append((f"llama-quantize {qtype}", timed([sys.executable, "-c", LLAMA_QUANTIZE, str(bf16), str(out), qtype,
                                                          str(args.threads)])))
        out.unlink()
    bf16.unlink()
    dist = work / "mt-release"
    mt_t, mt_rss = timed([sys.executable, "-m", "mt.cli", "release", str(src), "-o", str(dist), "--quants", ",".join(types),
                          "--no-verify", "--threads", str(args.threads), "--force", "--quiet"])
    shutil.rmtree(dist)
    flow_t, flow_rss = sum(t for _, (t, _) in steps), max(rss for _, (_, rss) in steps)
    print(f"{'step':<32} {'wall s':>8} {'peak RSS':>10}")
    for label, (t, rss) in steps:
        print(f"{label:<32} {t:>8.1f} {rss / 1e9:>8.2f} GB")
    print(f"{'the flow, all steps':<32} {flow_t:>8.1f} {flow_rss / 1e9:>8.2f} GB")
    print(f"{'mt release --no-verify':<32} {mt_t:>8.1f} {mt_rss / 1e9:>8.2f} GB")
    print(f"ratio: mt release is {flow_t / mt_t:.2f}x faster, peak RSS {mt_rss / flow_rss:.2f}x ({len(types)} types)")


if __name__ == "__main__":
    main()
