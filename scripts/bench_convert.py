"""Benchmark: llama.cpp's convert_hf_to_gguf.py vs `mt convert`, side by side in one run.

Builds a Llama-3.2-1B-shaped random bf16 checkpoint (1.24B parameters, 2 shards, real Llama-3
tokenizer), or with --moe a Qwen3-MoE-shaped one (1.05B parameters, 32 experts per layer stored one by
one, Qwen3's tokenizer), converts it with both tools for each out type, and prints wall time, peak RSS,
the ratios and whether the files are identical.

    python scripts/bench_convert.py [--moe] [--outtypes bf16,q8_0] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.checkpoints import write_llama3_tokenizer, write_qwen3_tokenizer  # noqa: E402
from tests.oracle import sdist_dir  # noqa: E402

LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}

QWEN3_MOE_1B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 1024,
    "intermediate_size": 3072, "moe_intermediate_size": 512, "num_experts": 32, "num_experts_per_tok": 4,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 14,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}
        if cfg["model_type"] == "qwen3_moe":
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        shapes |= mlp_shapes(cfg, p)
    return shapes


def mlp_shapes(cfg: dict, p: str) -> dict[str, tuple[int, ...]]:
    h = cfg["hidden_size"]
    if "num_experts" not in cfg:
        f = cfg["intermediate_size"]
        return {p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    f = cfg["moe_intermediate_size"]
    shapes = {p + "mlp.gate.weight": (cfg["num_experts"], h)}
    for x in range(cfg["num_experts"]):
        e = f"{p}mlp.experts.{x}."
        shapes |= {e + "gate_proj.weight": (f, h), e + "up_proj.weight": (f, h), e + "down_proj.weight": (h, f)}
    return shapes


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """bf16 bit patterns of magnitude ~2^-9..2^-5 with random sign and mantissa, made fast."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exponent = (118 + (bits & 3)).astype(np.uint16) << 7
    return (bits & np.uint16(0x807F)) | exponent


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(random_bf16(rng, int(np.prod(shapes[name]))).tobytes())


def build_checkpoint(folder: Path, config: dict = LLAMA_32_1B) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (write_qwen3_tokenizer if "num_experts" in config else write_llama3_tokenizer)(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = tensor_shapes(config)
    names = sorted(shapes)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    rng = np.random.default_rng(0)
    for shard, shard_names in parts.items():
        write_shard(folder / shard, shard_names, shapes, rng)
    weight_map = {n: shard for shard, ns in parts.items() for n in ns}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# Linux carries the parent's peak RSS into a forked child's ru_maxrss, so each tool is started from
# this small launcher instead of from the benchmark process (which held the generated checkpoint).
LAUNCHER = """
import os, subprocess, sys, tempfile, time
log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child (llama.cpp's tools) never blocks on it
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=log)
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss * 1024, status)
if status:
    log.seek(0)
    sys.stderr.write(log.read().decode(errors="replace")[-3000:])
"""


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=cwd, capture_output=True, text=True)
    elapsed, rss, status = proc.stdout.split()
    if int(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr}")
    return float(elapsed), int(rss)


def files_identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe", action="store_true", help="a Qwen3-MoE-shaped checkpoint (32 experts per layer)")
    parser.add_argument("--outtypes", default="bf16,q8_0")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-"))
    src = work / ("qwen3-moe-1b-shaped" if args.moe else "llama-3.2-1b-shaped")
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        build_checkpoint(src, QWEN3_MOE_1B if args.moe else LLAMA_32_1B)
        print(f"built {src} in {time.perf_counter() - t:.1f} s")
    converter = sdist_dir() / "convert_hf_to_gguf.py"
    subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    print(f"{'outtype':<8} {'tool':<22} {'wall s':>8} {'peak RSS':>10}")
    for outtype in args.outtypes.split(","):
        ref_out, mt_out = work / f"ref-{outtype}.gguf", work / f"mt-{outtype}.gguf"
        ref_t, ref_rss = timed([sys.executable, str(converter), str(src), "--outfile", str(ref_out), "--outtype", outtype], cwd=converter.parent)
        mt_t, mt_rss = timed([sys.executable, "-m", "mt.cli", "convert", str(src), "-o", str(mt_out), "--outtype", outtype, "--force", "--quiet"])
        print(f"{outtype:<8} {'convert_hf_to_gguf.py':<22} {ref_t:>8.1f} {ref_rss / 1e9:>8.2f} GB")
        print(f"{outtype:<8} {'mt convert':<22} {mt_t:>8.1f} {mt_rss / 1e9:>8.2f} GB")
        print(f"{outtype:<8} ratio: mt is {ref_t / mt_t:.2f}x faster, peak RSS {mt_rss / ref_rss:.2f}x; "
              f"files byte-identical: {files_identical(ref_out, mt_out)}")
        ref_out.unlink()
        mt_out.unlink()
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
