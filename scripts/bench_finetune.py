"""Benchmark of `mt finetune`'s trainer against a plain transformers + PEFT loop with identical settings, in one
process: the same random Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32/8 heads of 64, intermediate 8192,
vocab 128256, bf16; built here from a LlamaConfig and saved to a temporary folder), the same rows of --seq random
tokens (one sample per row, every token trained), LoRA r=16 alpha=32 on all linear layers, AdamW, constant
learning rate, gradient clipping at 1.0, the same seed (so the same LoRA init); --qlora loads the base as NF4
(bitsandbytes, double quantization) in both.

    python scripts/bench_finetune.py [--qlora] [--steps 10] [--warmup 3] [--seq 2048] [--grad-checkpointing]
                                     [--json FILE]
    python scripts/bench_finetune.py --small      # CPU smoke run on tiny shapes: correctness only, not timed

Prints for each side tokens/s (over the steps after --warmup) and peak CUDA memory (torch.cuda.max_memory_allocated,
model included), the ratios mt / plain (target: >= 2x tokens/s, <= 0.5x memory), and the largest relative
difference between the two runs' losses. The mt side runs with `--kernels` as mt finetune takes it (auto: the Triton
kernels on CUDA, plain PyTorch on the CPU; torch: the kernels' PyTorch references). Per-kernel speed-ups against PyTorch eager
and torch.compile: scripts/bench_kernels_train.py. Without CUDA (and without --small) it exits with a message.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0,
            max_position_embeddings=2048, rms_norm_eps=1e-5)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, LR, SEED = 16, 32.0, 2e-4, 0


@dataclass
class Setup:
    folder: Path
    device: torch.device
    dtype: torch.dtype
    qlora: bool
    rows: list[list[int]]  # one row of token ids per step (trained in the order of mt's step plan)
    warmup: int
    grad_checkpointing: bool


@dataclass
class Result:
    name: str
    tokens_per_s: float | None  # None: not timed (--small)
    peak_bytes: int | None
    losses: list[float]


def build_base(folder: Path, shapes: dict[str, Any], dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**shapes, architectures=["LlamaForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    del model
    return folder


def random_rows(vocab: int, seq: int, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(2, vocab, (count, seq), generator=generator).tolist()


class Meter:
    """Per-step timestamps (after the loss is read back, so the GPU is done) and the peak memory."""

    def __init__(self, device: torch.device, warmup: int, tokens_per_step: int) -> None:
        self.device, self.warmup, self.tokens_per_step = device, warmup, tokens_per_step
        self.times: list[float] = []
        self.losses: list[float] = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step(self, loss: float) -> None:
        self.losses.append(loss)
        self.times.append(time.perf_counter())

    def result(self, name: str, timed: bool) -> Result:
        cuda = self.device.type == "cuda"
        timed_steps = len(self.times) - self.warmup
        speed = None
        if timed and timed_steps > 0:
            speed = timed_steps * self.tokens_per_step / (self.times[-1] - self.times[self.warmup - 1])
        return Result(name, speed, torch.cuda.max_memory_allocated() if cuda else None, self.losses)


def plain_peft(s: Setup, timed: bool) -> Result:
    """The anchor: what a person writes with transformers + PEFT."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    meter = Meter(s.device, s.warmup, len(s.rows[0]))
    torch.manual_seed(SEED)
    if s.qlora:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=s.dtype)
        model = AutoModelForCausalLM.from_pretrained(s.folder, dtype=s.dtype, quantization_config=quant,
                                                     device_map={"": str(s.device)})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.grad_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_pretrained(s.folder, dtype=s.dtype).to(s.device)
        if s.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(LINEAR), bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    for row in in_mt_order(s.rows):
        ids = torch.tensor([row], device=s.device)
        labels = ids.clone()
        labels[0, 0] = -100  # as mt's data: a sample's first token is never a target (the model shifts anyway)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step(loss.item())
    result = meter.result("transformers+peft", timed)
    del model, optimizer, params
    return result


def mt_trainer(s: Setup, timed: bool, kernels: str) -> tuple[Result, str]:
    """mt finetune's own build + train, on the same rows (packed one sample per row, as mt packs a row that full)."""
    from mt.finetune.data import DataStats, Sample
    from mt.finetune.lora import LoraOptions
    from mt.finetune.trainer import Prepared, StepPlan, TrainOptions, build, causal_lm_loss, pick_loss, train

    seq = len(s.rows[0])
    options = TrainOptions(base=s.folder, data=s.folder / "unused.jsonl", output=s.folder / "unused-adapter",
                           lora=LoraOptions(r=RANK, alpha=ALPHA, target="all-linear", qlora=s.qlora),
                           max_steps=len(s.rows), lr=LR, schedule="constant", warmup_steps=0, batch_tokens=seq,
                           max_seq_len=seq, grad_checkpointing=s.grad_checkpointing, seed=SEED,
                           device=s.device.type, dtype={torch.bfloat16: "bf16", torch.float32: "f32"}[s.dtype],
                           kernels=kernels)
    samples = [Sample(row, [-100] + row[1:]) for row in s.rows]
    plan = StepPlan([seq] * len(samples), options)
    assert [samples[plan.rows(i)[0][0]].input_ids for i in range(len(samples))] == in_mt_order(s.rows)
    stats = DataStats(rows=len(samples), tokens=seq * len(samples), trained_tokens=(seq - 1) * len(samples))
    prepared = Prepared("LlamaForCausalLM", SimpleNamespace(pad_token_id=1, eos_token_id=1), samples, stats, plan,
                        len(samples), 0)
    meter = Meter(s.device, s.warmup, seq)
    trainable = build(options, "LlamaForCausalLM")
    mode = trainable.kernels
    train(options, prepared, trainable, lambda log: meter.step(log.loss), pick_loss(causal_lm_loss, trainable, False))
    result = meter.result("mt finetune", timed)
    del trainable
    return result, mode


def in_mt_order(rows: list[list[int]]) -> list[list[int]]:
    """The rows in the order mt's step plan trains them (each fills a packed row; the plan shuffles rows): the
    anchor trains them in this order too, so both sides see the same row at each step."""
    from mt.finetune.packing import epoch_groups

    order = epoch_groups([len(r) for r in rows], len(rows[0]), True, SEED, 0)
    return [rows[group[0]] for group in order]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def report(plain: Result, mt: Result, kernels: str, s: Setup) -> dict[str, Any]:
    out: dict[str, Any] = {"kernels": kernels, "qlora": s.qlora, "seq": len(s.rows[0]),
                           "steps": len(s.rows), "warmup": s.warmup, "device": str(s.device),
                           "plain": asdict(plain), "mt": asdict(mt),
                           "loss_max_rel_diff": max_rel_diff(mt.losses, plain.losses)}
    if plain.tokens_per_s and mt.tokens_per_s:
        out["speedup"] = mt.tokens_per_s / plain.tokens_per_s
    if plain.peak_bytes and mt.peak_bytes:
        out["memory_ratio"] = mt.peak_bytes / plain.peak_bytes
    return out


def print_report(r: dict[str, Any]) -> None:
    print(f"kernels: {r['kernels']}   {'QLoRA (NF4)' if r['qlora'] else 'LoRA'} r={RANK} all-linear, seq {r['seq']}, "
          f"{r['steps']} steps ({r['warmup']} warmup), {r['device']}")
    for side in ("plain", "mt"):
        x = r[side]
        speed = f"{x['tokens_per_s']:10,.0f} tokens/s" if x["tokens_per_s"] else "  (not timed)"
        memory = f"{x['peak_bytes'] / 2**30:7.2f} GiB peak" if x["peak_bytes"] else ""
        print(f"  {x['name']:<18} {speed}  {memory}   losses {x['losses'][0]:.4f} -> {x['losses'][-1]:.4f}")
    if "speedup" in r:
        print(f"  mt / plain: {r['speedup']:.2f}x tokens/s (target >= 2x), "
              f"{r.get('memory_ratio', float('nan')):.2f}x peak memory (target <= 0.5x)")
    print(f"  largest relative loss difference: {r['loss_max_rel_diff']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qlora", action="store_true", help="Base in NF4 (bitsandbytes) on both sides.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per side (default 10; --small 3).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps left out of the timing.")
    parser.add_argument("--seq", type=int, default=None, help="Tokens per row (default 2048; --small 64).")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--small", action="store_true", help="Tiny shapes in f32 on the CPU: correctness only.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report as JSON here.")
    parser.add_argument("--kernels", choices=("auto", "triton", "torch", "off"), default="auto",
                        help="mt's side, as mt finetune --kernels (auto: Triton on CUDA).")
    args = parser.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        sys.exit(f"bench_finetune: no CUDA device (torch {torch.__version__}); run it on a machine with an NVIDIA GPU, "
                 "or pass --small for the CPU smoke run")
    device = torch.device("cpu" if args.small else "cuda")
    dtype = torch.float32 if args.small else torch.bfloat16
    steps, seq = args.steps or (3 if args.small else 10), args.seq or (64 if args.small else 2048)
    warmup = min(args.warmup, steps - 1)
    with tempfile.TemporaryDirectory(prefix="mt-bench-ft-") as tmp:
        shapes = TINY if args.small else LLAMA_1B
        folder = build_base(Path(tmp) / "llama-1b-shaped", shapes, dtype)
        rows = random_rows(shapes["vocab_size"], seq, steps)
        s = Setup(folder, device, dtype, args.qlora, rows, warmup, args.grad_checkpointing)
        plain = plain_peft(s, timed=not args.small)
        free(device)
        mt, mode = mt_trainer(s, timed=not args.small, kernels=args.kernels)
        free(device)
    result = report(plain, mt, mode, s)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
