"""Peak memory and time of `mt verify` on a Llama-3.2-1B-shaped checkpoint (1.24B parameters, bf16, 2 shards).

Builds the checkpoint (random bf16 weights, the real Llama-3 tokenizer), converts it with mt to the given
out type, then runs `mt verify` in a fresh process and prints its report, which gives the peak RSS of each
phase (the exact checks, llama.cpp, transformers; VmHWM, reset between phases, so the process's own
ru_maxrss only covers the last phase) and their maximum, the process's peak, and the wall time.

    python scripts/bench_verify.py [--outtype q8_0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import build_checkpoint  # noqa: E402

CHILD = """
import resource, sys, time
from mt.cli import main
t = time.time()
try:
    main(sys.argv[1:])
finally:
    print(f"wall {time.time() - t:.1f} s, process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
          file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outtype", default="q8_0")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-verify-"))
    src = work / "llama-3.2-1b-shaped"
    if not (src / "config.json").is_file():
        build_checkpoint(src)
    gguf = work / f"model-{args.outtype}.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "mt.cli", "convert", str(src), "-o", str(gguf), "--outtype", args.outtype,
                        "--quiet"], check=True, cwd=ROOT)
    report = work / "verify.json"
    cmd = [sys.executable, "-c", CHILD, "verify", str(gguf), "--reference", str(src), "--json", str(report), "--force"]
    proc = subprocess.run(cmd, cwd=ROOT)
    data = json.loads(report.read_text())
    phases = data["peak_rss_mib"]
    print(json.dumps({"gguf_bytes": gguf.stat().st_size, "peak_rss_mib": phases, "process_peak_mib": max(phases.values()),
                      "reference_conversion": data.get("reference_conversion"), "passed": data["passed"]}))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
