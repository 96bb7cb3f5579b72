"""Benchmark: llama.cpp's llama-imatrix vs `mt imatrix`, side by side in one run on the same cores.

Builds llama-imatrix from the llama-cpp-python sdist of the registry with cmake (once, into the work folder),
converts the Llama-3.2-1B-shaped checkpoint of bench_convert.py to the F32 GGUF llama-imatrix runs on (mt runs the
bf16 checkpoint in float32: the same arithmetic), and times both over the same text, context and chunks. Then it
checks the files: mt's GGUF writer given llama-imatrix's numbers writes llama-imatrix's bytes, and mt's sums are
within the F16 KV cache's rounding of llama-imatrix's (~1e-3 relative; tests/imatrix compare them at 1e-4 with an
F32 cache).

    python scripts/bench_imatrix.py [--chunks 32] [--ctx 512] [--threads 2] [--device cpu] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import build_checkpoint, files_identical, timed  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
TEXT_SOURCES = ("docs/*.md", "README.md")  # repeated until the chunks are covered


def llama_imatrix_binary(work: Path) -> Path:
    """tools/imatrix built from the sdist (CPU, Release), reused when present."""
    build = work / "llama-imatrix-build"
    binary = build / "bin" / "llama-imatrix"
    if binary.is_file():
        return binary
    sdist = work / "sdist"
    if not list(sdist.glob("llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist),
                        LLAMA_CPP_PYTHON], check=True)
    tarball = next(sdist.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        tar.extractall(sdist, filter="data")
    source = next(sdist.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_OPENSSL=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-imatrix", "-j2"], check=True, capture_output=True)
    return binary


def calibration_text(path: Path, min_chars: int) -> Path:
    pages = [p.read_text(encoding="utf-8") for pattern in TEXT_SOURCES for p in sorted(ROOT.glob(pattern))]
    text = "\n\n".join(pages)
    path.write_text((text + "\n\n") * (min_chars // len(text) + 1), encoding="utf-8")
    return path


def gguf_sums(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    from gguf import GGUFReader

    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}
    sums = {n.removesuffix(".in_sum2"): v for n, v in tensors.items() if n.endswith(".in_sum2")}
    counts = {n.removesuffix(".counts"): v for n, v in tensors.items() if n.endswith(".counts")}
    return ({n: v.reshape(counts[n].size, -1) for n, v in sums.items()}, counts)


def check_files(theirs: Path, ours: Path, work: Path, dataset: str, ctx: int) -> None:
    from mt.quant.imatrix import ImatrixSums, write_imatrix_gguf

    their_sums, their_counts = gguf_sums(theirs)
    rewritten = work / "rewritten.gguf"
    write_imatrix_gguf(rewritten, ImatrixSums(their_sums, their_counts, dataset, ctx))
    print(f"mt's writer on llama-imatrix's numbers: {'byte-identical' if files_identical(rewritten, theirs) else 'DIFFERENT'}")
    our_sums, our_counts = gguf_sums(ours)
    same_counts = all(np.array_equal(our_counts[n], c) for n, c in their_counts.items()) and our_counts.keys() == their_counts.keys()
    worst = max((float(np.max(np.abs(our_sums[n] - v) / np.maximum(np.abs(v), 1e-30))), n) for n, v in their_sums.items())
    print(f"matrices: {len(their_sums)}, counts {'identical' if same_counts else 'DIFFERENT'}, "
          f"worst relative difference of the sums {worst[0]:.2e} ({worst[1]})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="mt imatrix --device (auto|cpu|cuda)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    src = work / "llama-3.2-1b-shaped"
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    binary = llama_imatrix_binary(work)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        subprocess.run([sys.executable, "-m", "mt.cli", "convert", str(src), "-o", str(f32), "--outtype", "f32", "--quiet"],
                       check=True, cwd=ROOT)
    text = calibration_text(work / "calibration.txt", min_chars=8 * args.ctx * (args.chunks + 2))
    sizes = ["-c", str(args.ctx), "--chunks", str(args.chunks)]
    theirs, ours = work / "llama-imatrix.gguf", work / "mt-imatrix.gguf"
    t_llama, rss_llama = timed([str(binary), "-m", str(f32), "-f", text.name, *sizes, "-t", str(args.threads),
                                "-o", str(theirs)], cwd=work)
    t_mt, rss_mt = timed([sys.executable, "-m", "mt.cli", "imatrix", str(src), "--text", text.name,
                          "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--device", args.device, "--dtype", "f32",
                          "-o", str(ours), "--force", "--quiet"], cwd=work)
    print(f"{args.chunks} chunks of {args.ctx} tokens, {args.threads} threads")
    print(f"llama-imatrix (F32 GGUF): {t_llama:8.1f} s  peak RSS {rss_llama / 2**30:.2f} GiB")
    print(f"mt imatrix ({args.device}, f32):   {t_mt:8.1f} s  peak RSS {rss_mt / 2**30:.2f} GiB")
    print(f"mt speed / llama-imatrix speed: {t_llama / t_mt:.2f}x")
    check_files(theirs, ours, work, text.name, args.ctx)


if __name__ == "__main__":
    main()
