"""GPU check of the Triton quantizers: bytes, whole files, speed. One run, every step logged, ~3-6 minutes.

1. kernels: Triton bytes == numpy reference bytes (== ggml's, when llama_cpp is importable) on a few MB
   of random and adversarial rows per type (Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS); first-call (compile) time and
   kernel throughput on data already on the GPU.
2. files: builds the Llama-3.2-1B-shaped bf16 checkpoint (scripts/bench_convert.py), `mt convert
   --outtype bf16`, then per type `mt quantize --device cuda` vs llama_model_quantize (16 threads): wall
   time, peak RSS, whole-file byte comparison; plus `mt convert --outtype q4_k_m --device cuda`.
   Without llama_cpp the baseline and the comparison are skipped, the mt timings still run.
3. prints a summary and writes it to $OUT/gpu_check.json (or --out DIR).

A failing step is logged with its traceback and the run goes on.

Here, once (copies the three llama.cpp sdist files the checkpoint builder needs, ~8 MB, into DIR):
    python3 scripts/gpu_check.py --prepare-cache .gpu_cache
On the GPU machine, from the repo root (carry .gpu_cache and the gguf / llama_cpp packages):
    PYTHONPATH=$PWD:<carried site-packages> MT_CACHE=$PWD/.gpu_cache PYTHONUNBUFFERED=1 \
        python3 scripts/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import LAUNCHER  # noqa: E402  (a child's own peak RSS)

KERNEL_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS")
FILE_TYPES = ("q4_k_m", "q8_0", "q5_k_m", "q6_k")
VALUES_PER_TYPE = 1 << 22  # 16 MB of float32 per type
N_PER_ROW = 4096
STEP_TIMEOUT_S = 150
BUDGET_S = 330  # later steps are skipped past this, so the whole run stays under ~6 minutes
SDIST_FILES = ("convert_hf_to_gguf.py", "models/ggml-vocab-llama-bpe.gguf",
               "models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja")

START = time.perf_counter()
REPORT: dict[str, Any] = {"steps": {}}


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def step(name: str, fn: Callable[[], Any]) -> Any:
    """Run one step, record its result or its error, never raise."""
    if time.perf_counter() - START > BUDGET_S:
        REPORT["steps"][name] = {"ok": False, "error": "skipped: time budget spent"}
        log(f"{name}: skipped (time budget)")
        return None
    log(f"{name} ...")
    t = time.perf_counter()
    try:
        result = fn()
        REPORT["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t, 2), "result": result}
        log(f"{name}: ok in {time.perf_counter() - t:.1f} s: {json.dumps(result, default=str)[:600]}")
        return result
    except BaseException as e:  # noqa: BLE001  (SystemExit from a failed child included)
        if isinstance(e, KeyboardInterrupt):
            raise
        REPORT["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t, 2),
                                 "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        log(f"{name}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        return None


# ----------------------------------------------------------------------------------------- environment


def environment() -> dict:
    import torch
    import triton

    info = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
            "triton": triton.__version__, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import llama_cpp

        info["llama_cpp"] = llama_cpp.__version__
    except Exception as e:  # noqa: BLE001
        info["llama_cpp"] = f"absent ({type(e).__name__})"
    from mt.quant.device import select_device

    info["auto_device"] = "cuda" if select_device("auto") is not None else "cpu"
    return info


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------ 1. kernels


def check_rows(n: int, n_rows: int, seed: int) -> np.ndarray:
    """Random rows over many magnitudes and shapes, plus tests/quant's adversarial rows."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 3),
        lambda: rng.standard_t(1.5, n) * 0.02,
        lambda: rng.standard_t(4, n) * 10.0 ** rng.uniform(-4, 1),
        lambda: np.where(rng.random(n) < 0.02, rng.standard_normal(n) * 50, rng.standard_normal(n) * 1e-3),
        lambda: np.repeat(rng.standard_normal(n // 16), 16) * 0.1,  # constant runs, flat sub-blocks
        lambda: rng.integers(-8, 8, n) * 2.0 ** rng.integers(-12, 2),  # exact ties after scaling
        lambda: np.abs(rng.standard_normal(n)) * 0.05 + 0.01,  # all positive: min clamps to 0
        lambda: rng.standard_normal(n) * 6e-8,  # near fp16 underflow
        lambda: np.where(np.arange(n) % 256 < 16, 0.0, rng.standard_normal(n)),  # zero sub-blocks
    ]
    rows = [kinds[i % len(kinds)]() for i in range(n_rows)]
    values = np.array(rows, dtype=np.float32)
    bf16 = (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # what a bf16 checkpoint holds
    values[1::3] = bf16[1::3]
    try:
        from tests.quant.test_types import adversarial_rows

        values = np.concatenate([adversarial_rows(n), values])
    except Exception as e:  # noqa: BLE001
        log(f"adversarial rows unavailable ({type(e).__name__}: {e}); random rows only")
    return values


def first_difference(a: np.ndarray, b: np.ndarray) -> dict | None:
    rows = np.nonzero((a != b).any(axis=1))[0]
    if rows.size == 0:
        return None
    r = int(rows[0])
    cols = np.nonzero(a[r] != b[r])[0]
    return {"rows_differing": int(rows.size), "first_row": r, "byte_offsets": cols[:16].tolist(),
            "ours": a[r, cols[:16]].tolist(), "theirs": b[r, cols[:16]].tolist()}


def kernel_check(type_name: str) -> dict:
    import torch
    from gguf import GGMLQuantizationType as T

    from mt.quant import triton_quant
    from mt.quant.types import quant_type

    ggml_type = T[type_name]
    qt = quant_type(ggml_type)
    rows = check_rows(N_PER_ROW, VALUES_PER_TYPE // N_PER_ROW, seed=list(KERNEL_TYPES).index(type_name))
    result: dict[str, Any] = {"values": int(rows.size)}
    blocks = torch.from_numpy(rows.reshape(-1, qt.block_size)).cuda()
    t = time.perf_counter()
    ours = triton_quant.quantize_blocks(blocks, ggml_type).cpu().numpy().reshape(rows.shape[0], -1)
    result["first_call_s"] = round(time.perf_counter() - t, 2)  # includes the compile
    t = time.perf_counter()
    reference = qt.quantize(rows).reshape(rows.shape[0], -1)
    result["numpy_reference_s"] = round(time.perf_counter() - t, 2)
    diff = first_difference(ours, reference)
    result["equal_numpy_reference"] = diff is None
    if diff:
        result["numpy_difference"] = diff
    if have_llama_cpp():
        from tests.ggml_ref import ggml_quantize

        ggml = ggml_quantize(int(ggml_type), rows)
        result["equal_ggml"] = bool(np.array_equal(ours, ggml))
        result["numpy_reference_equal_ggml"] = bool(np.array_equal(reference, ggml))
        if not result["equal_ggml"]:
            result["ggml_difference"] = first_difference(ours, ggml)
    result["throughput_Mvalues_per_s"] = kernel_throughput(ggml_type, qt.block_size)
    return result


def kernel_throughput(ggml_type: Any, block_size: int) -> float:
    import torch

    from mt.quant import triton_quant

    x = torch.randn(1 << 26, device="cuda").view(-1, block_size) * 0.02
    triton_quant.quantize_blocks(x[:4096], ggml_type)
    torch.cuda.synchronize()
    t = time.perf_counter()
    triton_quant.quantize_blocks(x, ggml_type)
    torch.cuda.synchronize()
    return round(x.numel() / (time.perf_counter() - t) / 1e6, 1)


# -------------------------------------------------------------------------------------------- 2. files

LLAMA_QUANTIZE = """
import sys, llama_cpp
from mt.quant.quantize import parse_file_type
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(parse_file_type(sys.argv[3])); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""

def timed(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    elapsed, rss, status = proc.stdout.split()
    if int(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} exited with {status}: {proc.stderr[-2000:]}")
    return {"wall_s": round(float(elapsed), 2), "peak_rss_gb": round(int(rss) / 1e9, 3)}


def mt_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mt.cli", *args]


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def tensor_data_report(ours: Path, ref: Path) -> dict:
    """Where two GGUFs differ: metadata keys, tensor types, tensor bytes (first few names)."""
    from mt.io.gguf_in import read_header

    a, b = read_header(ours, raw_strings=True), read_header(ref, raw_strings=True)
    report: dict[str, Any] = {"kv_equal": a.kv == b.kv,
                              "tensor_infos_equal": [(t.name, t.type) for t in a.tensors] == [(t.name, t.type) for t in b.tensors]}
    differing = []
    by_name = {t.name: t for t in b.tensors}
    with open(ours, "rb") as fa, open(ref, "rb") as fb:
        for t in a.tensors:
            u = by_name.get(t.name)
            if u is None or u.nbytes != t.nbytes:
                differing.append(t.name)
                continue
            fa.seek(t.offset)
            fb.seek(u.offset)
            if fa.read(t.nbytes) != fb.read(u.nbytes):
                differing.append(f"{t.name} ({t.type.name})")
    report["tensors_differing"] = len(differing)
    report["first_differing"] = differing[:8]
    return report


def build_bf16_gguf(work: Path, tiny: bool) -> dict:
    import scripts.bench_convert as bench
    from scripts.bench_convert import build_checkpoint

    if tiny:  # a smoke test of this script on a CPU machine
        bench.LLAMA_32_1B = {**bench.LLAMA_32_1B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}

    src = work / "llama-3.2-1b-shaped"
    t = time.perf_counter()
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    built = round(time.perf_counter() - t, 1)
    bf16 = work / "bf16.gguf"
    convert = timed(mt_cli("convert", str(src), "-o", str(bf16), "--outtype", "bf16", "--force", "--quiet"))
    return {"checkpoint_build_s": built, "mt_convert_bf16": convert, "bytes": bf16.stat().st_size}


def compare_type(work: Path, file_type: str, threads: int, baseline: bool, device: str) -> dict:
    bf16, ref, ours = work / "bf16.gguf", work / f"ref-{file_type}.gguf", work / f"mt-{file_type}.gguf"
    result: dict[str, Any] = {}
    if baseline:
        result["llama_quantize"] = timed([sys.executable, "-c", LLAMA_QUANTIZE, str(bf16), str(ref), file_type, str(threads)])
    result["mt"] = timed(mt_cli("quantize", str(bf16), str(ours), file_type, "--device", device, "--force", "--quiet"))
    if baseline:
        result["speedup"] = round(result["llama_quantize"]["wall_s"] / result["mt"]["wall_s"], 2)
        result["rss_ratio"] = round(result["mt"]["peak_rss_gb"] / result["llama_quantize"]["peak_rss_gb"], 2)
        result["identical"] = identical(ours, ref)
        if not result["identical"]:
            result["difference"] = tensor_data_report(ours, ref)
    ours.unlink(missing_ok=True)
    if file_type != "q4_k_m":
        ref.unlink(missing_ok=True)
    return result


def convert_q4_k_m(work: Path, device: str) -> dict:
    """mt convert straight to Q4_K_M on the GPU; compared with llama-quantize's file from the bf16 GGUF."""
    out, ref = work / "convert-q4_k_m.gguf", work / "ref-q4_k_m.gguf"
    result: dict[str, Any] = {"mt_convert_cuda": timed(mt_cli("convert", str(work / "llama-3.2-1b-shaped"), "-o", str(out),
                                                              "--outtype", "q4_k_m", "--device", device, "--force", "--quiet"))}
    if ref.is_file():
        result["identical_to_llama_quantize_of_bf16"] = identical(out, ref)
        if not result["identical_to_llama_quantize_of_bf16"]:
            result["difference"] = tensor_data_report(out, ref)
    out.unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------------------- main


def summary_lines() -> list[str]:
    steps = REPORT["steps"]
    lines = []
    for name, s in steps.items():
        if not s["ok"]:
            lines.append(f"{name:<22} FAILED  {s['error'][:200]}")
            continue
        r = s["result"]
        if name.startswith("kernel "):
            lines.append(f"{name:<22} numpy-ref equal {r.get('equal_numpy_reference')}, ggml equal {r.get('equal_ggml', 'n/a')}, "
                         f"{r.get('throughput_Mvalues_per_s')} Mvalues/s on GPU, first call {r.get('first_call_s')} s")
        elif name.startswith("quantize "):
            ref = r.get("llama_quantize", {})
            lines.append(f"{name:<22} mt {r['mt']['wall_s']} s / {r['mt']['peak_rss_gb']} GB; "
                         f"llama-quantize {ref.get('wall_s', 'n/a')} s / {ref.get('peak_rss_gb', 'n/a')} GB; "
                         f"speedup {r.get('speedup', 'n/a')}x; identical {r.get('identical', 'n/a')}")
        else:
            lines.append(f"{name:<22} {json.dumps(r, default=str)[:300]}")
    return lines


def prepare_cache(target: Path) -> None:
    """Copy the sdist files build_checkpoint reads into a folder laid out as MT_CACHE expects."""
    from tests.oracle import _CACHE_NAME, _VENDOR, sdist_dir

    source = sdist_dir()
    for rel in SDIST_FILES:
        dest = target / _CACHE_NAME / _VENDOR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest)
    print(f"wrote {target} ({sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
          f"carry it and set MT_CACHE=$PWD/{target}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--types", default=",".join(FILE_TYPES))
    parser.add_argument("--skip-files", action="store_true", help="only step 1")
    parser.add_argument("--prepare-cache", type=Path, default=None, metavar="DIR")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu + --tiny: smoke test without a GPU
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_cache is not None:
        prepare_cache(args.prepare_cache)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    REPORT["environment"] = step("environment", environment)
    for type_name in KERNEL_TYPES:
        step(f"kernel {type_name}", lambda type_name=type_name: kernel_check(type_name))
    if not args.skip_files:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-gpu-check-"))
        baseline = have_llama_cpp()
        if not baseline:
            log("llama_cpp is not importable: llama-quantize baseline and byte comparisons are skipped")
        if step("build bf16 gguf", lambda: build_bf16_gguf(work, args.tiny)) is not None:
            for file_type in args.types.split(","):
                step(f"quantize {file_type}", lambda ft=file_type: compare_type(work, ft, args.threads, baseline, args.device))
            step("convert q4_k_m cuda", lambda: convert_q4_k_m(work, args.device))
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    REPORT["total_s"] = round(time.perf_counter() - START, 1)
    REPORT["summary"] = summary_lines()
    print("\n==== summary ====")
    print("\n".join(REPORT["summary"]))
    print(f"total {REPORT['total_s']} s")
    (args.out / "gpu_check.json").write_text(json.dumps(REPORT, indent=2, default=str))


if __name__ == "__main__":
    main()
