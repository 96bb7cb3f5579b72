"""Benchmark: peft's merge_and_unload + save_pretrained vs `mt merge`, side by side in one run.

Builds (or reuses) the Llama-3.2-1B-shaped bf16 checkpoint of bench_convert.py (1.24B parameters, 2 shards,
real Llama-3 tokenizer) and, cached next to it, a rank-64 LoRA adapter on every linear layer
(q, k, v, o, gate, up, down; seeded nonzero A and B) made with peft by tests/merge/adapters.py. Then it merges
the adapter into the base with both tools, each in its own process:

  peft: transformers loads the base in bf16, PeftModel.from_pretrained, merge_and_unload, save_pretrained
        (and the tokenizer saved beside it, as a merge script does);
  mt:   mt merge BASE ADAPTER -o OUT --dtype bf16

and prints wall time, peak RSS and their ratios, then
checks both outputs hold the same tensor names, shapes and dtypes and prints the largest relative
difference (max |mt - peft| / max |peft|) of a few tensors. On a bf16 base peft casts the adapter to fp32
(autocast_adapter_dtype), computes (B @ A) * scaling in fp32 and adds it in place to the bf16 weight, which
rounds once to bf16: the same arithmetic as a merge in fp32 cast once at the end, so the outputs can be
bit-equal (they are for peft's own fp32 merge cast to bf16 on the --small model); a different summation
order in B @ A may flip a rare element by one bf16 unit in the last place (relative ~4e-3).

    python scripts/bench_merge.py [--small] [--rank 64] [--tools peft,mt] [--workdir DIR] [--keep]

--small uses a 2-layer, hidden-64 model of the same layout (runs in seconds); `--tools peft` runs only
peft's side. mt's side is skipped with a note while `mt merge` does not exist.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_convert import LLAMA_32_1B, build_checkpoint, timed  # noqa: E402

SMALL = {**LLAMA_32_1B, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}

BUILD_ADAPTER = """
import sys
from tests.merge.adapters import AdapterSpec, build_adapter
rank = int(sys.argv[3])
build_adapter(sys.argv[1], sys.argv[2], AdapterSpec(r=rank, lora_alpha=2 * rank, base_dtype="auto", seed=0))
"""

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""

# a few tensors to compare by value: first and last layer, attention and MLP, and the (tied) embeddings
COMPARED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight", "model.layers.{last}.mlp.down_proj.weight")


def ensure_checkpoint(folder: Path, config: dict) -> Path:
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        build_checkpoint(folder, config)
        print(f"built {folder} in {time.perf_counter() - t:.1f} s")
    return folder


def ensure_adapter(base: Path, folder: Path, rank: int) -> Path:
    if not (folder / "adapter_model.safetensors").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD_ADAPTER, str(base), str(folder), str(rank)], check=True, cwd=ROOT)
        print(f"built {folder} (rank {rank}) in {time.perf_counter() - t:.1f} s")
    return folder


def mt_merge_available() -> bool:
    probe = subprocess.run([sys.executable, "-m", "mt.cli", "merge", "--help"], capture_output=True, cwd=ROOT)
    return probe.returncode == 0


def merge_commands(base: Path, adapter: Path, out: Path) -> dict[str, list[str]]:
    return {
        "peft": [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(out)],
        "mt": [sys.executable, "-m", "mt.cli", "merge", str(base), str(adapter), "-o", str(out), "--dtype", "bf16",
               "--force"],
    }


def safetensors_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def tensor_layout(folder: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) over every safetensors file in an output folder."""
    layout: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            layout[name] = (info["dtype"], tuple(info["shape"]), path)
    return layout


def max_relative_difference(name: str, ours: Path, ref: Path) -> tuple[float, float]:
    """(max |ours - ref| / max |ref|, fraction of elements that differ) for one tensor."""
    from safetensors import safe_open

    with safe_open(str(ours), "pt") as a, safe_open(str(ref), "pt") as b:
        x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
    return ((x - y).abs().max() / y.abs().max()).item(), (x != y).float().mean().item()


def compare_outputs(mt_out: Path, peft_out: Path, n_layers: int) -> None:
    ours, ref = tensor_layout(mt_out), tensor_layout(peft_out)
    same_layout = {n: v[:2] for n, v in ours.items()} == {n: v[:2] for n, v in ref.items()}
    print(f"same tensor names, shapes and dtypes: {same_layout} ({len(ours)} in mt's output, {len(ref)} in peft's)")
    if not same_layout:
        print(f"  only in mt: {sorted(set(ours) - set(ref))[:8]}  only in peft: {sorted(set(ref) - set(ours))[:8]}")
        diff = [n for n in set(ours) & set(ref) if ours[n][:2] != ref[n][:2]]
        print(f"  dtype/shape differ: {[(n, ours[n][:2], ref[n][:2]) for n in sorted(diff)[:8]]}")
    for name in (n.format(last=n_layers - 1) for n in COMPARED):
        if name in ours and name in ref:
            rel, frac = max_relative_difference(name, ours[name][2], ref[name][2])
            print(f"  {name}: max relative difference {rel:.3g}, {100 * frac:.3g}% of elements differ")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a 2-layer hidden-64 model of the same layout")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tools", default="peft,mt")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs (and a temporary workdir)")
    args = parser.parse_args()
    config = SMALL if args.small else LLAMA_32_1B
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-merge-"))
    base = ensure_checkpoint(work / ("llama-small" if args.small else "llama-3.2-1b-shaped"), config)
    adapter = ensure_adapter(base, base.parent / f"{base.name}-lora-r{args.rank}", args.rank)
    print(f"adapter: {folder_bytes(adapter) / 1e6:.0f} MB, base: {folder_bytes(base) / 1e9:.2f} GB")
    tools = args.tools.split(",")
    if "mt" in tools and not mt_merge_available():
        print("mt merge is not available in this mt; running peft's side only")
        tools.remove("mt")
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    outputs = {tool: work / f"merged-{tool}" for tool in tools}
    commands = {tool: merge_commands(base, adapter, out)[tool] for tool, out in outputs.items()}
    results = {tool: timed(cmd, cwd=ROOT) for tool, cmd in commands.items()}
    print(f"{'tool':<28} {'wall s':>8} {'peak RSS':>10}")
    labels = {"peft": "peft merge_and_unload+save", "mt": "mt merge"}
    for tool, (seconds, rss) in results.items():
        print(f"{labels[tool]:<28} {seconds:>8.1f} {rss / 1e9:>7.2f} GB")
    if len(results) == 2:
        (peft_t, peft_rss), (mt_t, mt_rss) = results["peft"], results["mt"]
        print(f"ratio: mt is {peft_t / mt_t:.2f}x faster, peak RSS {mt_rss / peft_rss:.2f}x peft's")
        compare_outputs(outputs["mt"], outputs["peft"], config["num_hidden_layers"])
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
