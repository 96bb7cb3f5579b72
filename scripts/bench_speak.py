"""Benchmark: `mt speak` (llama.cpp backbone, mt's head and codec) vs HumeAI's PyTorch `generate`, same model, same
text, same noise, same threads, on the CPU. Prints each side's synthesis time (the second of two runs: the first
warms up), the speech's length, the real-time factor (synthesis seconds per second of speech) and their ratio.

The model is random, built by HumeAI's own classes (tests/speak/hume_generate.py, in its venv): `tiny` is the test's
shape; `1b` is Llama-3.2-1B's backbone (16 layers, hidden 2048) with tada-3b-ml's acoustic sizes (acoustic_dim 512,
256 time classes, a 6-layer head) and the real codec decoder's sizes. mt runs it at F32 and Q4_K_M, and at Q4_K_M with
the flow head in bf16 (--head-dtype bf16).

    python scripts/bench_speak.py [--size tiny|1b] [--threads 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.checkpoints import LLAMA3_ROPE_SCALING, write_llama32_tokenizer  # noqa: E402
from tests.tada_oracle import run_hume  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. It was a bright and sunny day in the park."
LLAMA3 = dict(vocab_size=128256, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
              rope_scaling=dict(LLAMA3_ROPE_SCALING), tie_word_embeddings=True, bos_token_id=128000,
              eos_token_id=[128001, 128008, 128009], shift_acoustic=5)
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, acoustic_dim=16, num_time_classes=64, head_layers=2, head_ffn_ratio=3.0),
             dict(embed_dim=16, hidden_dim=32, num_attn_layers=2, num_attn_heads=4, attn_dim_feedforward=64,
                  wav_decoder_channels=32, strides=[4, 4, 5, 6], block_attention="v2")),
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, acoustic_dim=512, num_time_classes=256, head_layers=6, head_ffn_ratio=3.0),
           dict(embed_dim=512, hidden_dim=1024, num_attn_layers=6, num_attn_heads=8, attn_dim_feedforward=4096,
                wav_decoder_channels=1536, strides=[4, 4, 5, 6], block_attention="v2")),
}


FRAMES_PER_TOKEN = 12  # about what real speech gives (3 to 4 tokens a second at 50 frames a second)
INIT_STD = {"tiny": 0.05, "1b": 0.005}  # small enough that the random head's velocities keep the time bits near ±1


def gray_bits(value: int, n_bits: int) -> np.ndarray:
    gray = value ^ (value >> 1)
    return np.array([1.0 if (gray >> (n_bits - 1 - i)) & 1 else -1.0 for i in range(n_bits)], np.float32)


def bench_noise(config: dict, rows: int = 256) -> np.ndarray:
    """Acoustic noise as the model draws it; time-bit noise that encodes FRAMES_PER_TOKEN, so a random model speaks
    at a realistic pace (random bits would give 128 frames a token on average, and a codec run of minutes)."""
    bits = int(np.ceil(np.log2(config["num_time_classes"])))
    acoustic = np.random.default_rng(0).standard_normal((rows, config["acoustic_dim"])).astype(np.float32)
    times = np.tile(np.concatenate([gray_bits(FRAMES_PER_TOKEN, bits)] * 2) * 1.1, (rows, 1))
    return np.concatenate([acoustic, times], axis=1)


def build_and_run_hume(work: Path, size: str, threads: int) -> tuple[dict, np.ndarray]:
    config, decoder = SIZES[size]
    tokenizer = work / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    write_llama32_tokenizer(tokenizer)
    noise = bench_noise(config)
    np.save(work / "noise.npy", noise)
    spec = {"tokenizer": str(tokenizer), "config": {**LLAMA3, **config}, "decoder": decoder, "seed": 1,
            "init_std": INIT_STD[size], "conv_gain": 0.6, "text": TEXT, "noise": str(work / "noise.npy"), "threads": threads,
            "repeat": 2, "options": {"text_do_sample": False}}
    oracle = run_hume(spec, work / "hume")
    for f in tokenizer.iterdir():
        shutil.copy(f, work / "hume" / "tada" / f.name)
    return oracle, noise


def convert(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "mt.cli", "convert", *args, "--quiet", "--force"], check=True)


def mt_speak(backbone: Path, noise: np.ndarray, threads: int, head_dtype: str = "f32") -> tuple[float, float, float]:
    """(load seconds, synthesis seconds of the second of two runs, speech seconds)."""
    from mt.speak.speak import Speaker, SpeakOptions

    began = time.perf_counter()
    with Speaker(backbone, options=SpeakOptions(threads=threads, head_dtype=head_dtype)) as speaker:
        loaded = time.perf_counter()
        for _ in range(2):  # the first run pays for warming up, as HumeAI's first generate does
            rows = iter(noise)
            start = time.perf_counter()
            speech = speaker.say(TEXT, noise=lambda n: next(rows))
            done = time.perf_counter()
    return loaded - began, done - start, speech.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mt-bench-speak-"))
    oracle, noise = build_and_run_hume(work, args.size, args.threads)
    hume_s, hume_audio = float(oracle["seconds"]), len(oracle["wav"]) / 24000
    rows = [("HumeAI generate (PyTorch F32)", None, hume_s, hume_audio)]
    (work / "f32").mkdir(exist_ok=True)
    convert([str(work / "hume" / "decoder"), "-o", str(work / "f32" / "tada-codec.gguf"), "--outtype", "f32"])
    for outtype in ("f32", "q4_k_m"):
        folder = work / outtype
        folder.mkdir(exist_ok=True)
        convert([str(work / "hume" / "tada"), "-o", str(folder / "tada.gguf"), "--outtype", outtype])
        if outtype != "f32":
            shutil.copy(work / "f32" / "tada-codec.gguf", folder / "tada-codec.gguf")
        load, synth, audio = mt_speak(folder / "tada.gguf", noise, args.threads)
        rows.append((f"mt speak ({outtype.upper()} backbone)", load, synth, audio))
    load, synth, audio = mt_speak(work / "q4_k_m" / "tada.gguf", noise, args.threads, "bf16")
    rows.append(("mt speak (Q4_K_M, bf16 head)", load, synth, audio))
    print(f"size {args.size}, {args.threads} threads, text of {len(TEXT)} characters")
    print(f"{'':<32} {'load s':>7} {'synth s':>8} {'speech s':>9} {'RTF':>7}")
    for label, load, synth, audio in rows:
        print(f"{label:<32} {'' if load is None else f'{load:.1f}':>7} {synth:>8.2f} {audio:>9.2f} {synth / audio:>7.3f}")
    hume_rtf = hume_s / hume_audio
    for label, _, synth, audio in rows[1:]:
        print(f"ratio: {label} is {hume_rtf / (synth / audio):.2f}x HumeAI's speed (real-time factor)")


if __name__ == "__main__":
    main()
