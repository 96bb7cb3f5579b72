"""GPU benchmark of the training kernels (mt/kernels): each Triton kernel against its PyTorch reference run eagerly
and under torch.compile, forward + backward, at Llama-3.2-1B's shapes (hidden 2048, seq 2048, vocab 128256,
32 query / 8 key-value heads of 64, intermediate 8192), bf16. Before timing, each kernel's output and gradients are
compared with the eager reference at those shapes (the compiled Triton path's numbers; the CPU tests only run
Triton's interpreter).

    python scripts/bench_kernels_train.py [--kernels rms_norm,rope,swiglu,geglu,lora,lora_nf4,cross_entropy,cross_entropy_softcap]
                                          [--batch 1] [--seq 2048] [--repeats 20] [--no-compile] [--json FILE]

Prints per kernel: median milliseconds of forward + backward, the speed-ups of Triton over eager and over
torch.compile (>1: Triton faster), peak CUDA memory of each path, and the largest relative difference to the
reference. Needs a CUDA GPU with triton; elsewhere it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, VOCAB, Q_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, RANK = 2048, 128256, 32, 8, 64, 8192, 16
KERNELS = ("rms_norm", "rope", "swiglu", "geglu", "lora", "lora_nf4", "cross_entropy", "cross_entropy_softcap")


@dataclass
class Case:
    """One kernel's benchmark: fresh leaf inputs, the Triton call and the reference on them, which leaves get
    gradients."""

    name: str
    make_inputs: Callable[[], list]
    triton_fn: Callable
    reference_fn: Callable
    grad_of: Sequence[int]


def cuda_or_exit():
    try:
        import torch
    except ImportError:
        sys.exit("bench_kernels_train: torch is not installed; this benchmark needs a CUDA build of torch and triton")
    if not torch.cuda.is_available():
        sys.exit(f"bench_kernels_train: no CUDA device (torch {torch.__version__}); run it on a machine with an "
                 "NVIDIA GPU, a CUDA build of torch and triton")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_kernels_train: triton is not installed; pip install triton")
    return torch


def cases(torch, batch: int, seq: int, dev: str = "cuda") -> dict[str, Case]:
    from mt import kernels as K

    bf16 = torch.bfloat16
    tokens = batch * seq

    def randn(*shape, scale=1.0, dtype=bf16, grad=False):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_(grad)

    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=dev, dtype=torch.float32) / HEAD_DIM)
    positions = torch.arange(seq, device=dev)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().to(bf16)[None].expand(batch, seq, HEAD_DIM)  # transformers' position embeddings [b, s, d]
    sin = emb.sin().to(bf16)[None].expand(batch, seq, HEAD_DIM)

    def rope_triton(q, k):
        return K.apply_rope_(q.clone(), k.clone(), cos, sin)  # clones: in place on a leaf that needs grad is refused

    def rope_reference(q, k):
        return K.rope_reference(q.clone(), k.clone(), cos, sin)

    def lora_inputs():
        return [randn(batch, seq, HIDDEN, grad=True), randn(INTERMEDIATE, HIDDEN, scale=HIDDEN ** -0.5),
                randn(RANK, HIDDEN, scale=HIDDEN ** -0.5, grad=True), randn(INTERMEDIATE, RANK, scale=0.01, grad=True)]

    table = {
        "rms_norm": Case(f"rms_norm [{tokens} x {HIDDEN}]", lambda: [randn(batch, seq, HIDDEN, grad=True),
                                                           randn(HIDDEN, scale=0.1, grad=True)],
                         lambda x, w: K.rms_norm(x, w, 1e-5), lambda x, w: K.rms_norm_reference(x, w, 1e-5), (0, 1)),
        "rope": Case(f"rope q {Q_HEADS}x{HEAD_DIM}, k {KV_HEADS}x{HEAD_DIM}",
                     lambda: [randn(batch, Q_HEADS, seq, HEAD_DIM, grad=True),
                              randn(batch, KV_HEADS, seq, HEAD_DIM, grad=True)],
                     rope_triton, rope_reference, (0, 1)),
        "swiglu": Case(f"swiglu [{tokens} x {INTERMEDIATE}]", lambda: [randn(batch, seq, INTERMEDIATE, grad=True),
                                                       randn(batch, seq, INTERMEDIATE, grad=True)],
                       K.swiglu, K.swiglu_reference, (0, 1)),
        "geglu": Case(f"geglu [{tokens} x {INTERMEDIATE}]", lambda: [randn(batch, seq, INTERMEDIATE, grad=True),
                                                     randn(batch, seq, INTERMEDIATE, grad=True)],
                      K.geglu, K.geglu_reference, (0, 1)),
        "lora": Case(f"lora {HIDDEN}->{INTERMEDIATE} r{RANK} bf16 base", lora_inputs,
                     lambda x, w, a, b: K.lora_linear(x, w, a, b, 2.0),
                     lambda x, w, a, b: K.lora_linear_reference(x, w, a, b, 2.0), (0, 2, 3)),
        "cross_entropy": Case(f"cross_entropy {tokens} tok x {VOCAB}", lambda: [
            randn(tokens, HIDDEN, grad=True), randn(VOCAB, HIDDEN, scale=HIDDEN ** -0.5),
            torch.randint(0, VOCAB, (tokens,), device=dev)],
            lambda h, w, y: K.chunked_cross_entropy(h, w, y), K.cross_entropy_reference, (0,)),
        "cross_entropy_softcap": Case(f"cross_entropy softcap 30 {tokens} tok x {VOCAB}", lambda: [
            randn(tokens, HIDDEN, grad=True), randn(VOCAB, HIDDEN, scale=HIDDEN ** -0.5),
            torch.randint(0, VOCAB, (tokens,), device=dev)],
            lambda h, w, y: K.chunked_cross_entropy(h, w, y, softcap=30.0),
            lambda h, w, y: K.cross_entropy_reference(h, w, y, softcap=30.0), (0,)),
    }
    try:
        import bitsandbytes.functional as bnb_functional

        def nf4_inputs():  # as mt finetune --qlora loads the base: NF4, blocks of 64, double-quantized scales
            x, w, a, b = lora_inputs()
            return [x, bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True), a, b]

        # Triton decodes the packed W inside the matmul; the reference dequantizes it with bitsandbytes
        table["lora_nf4"] = Case(f"lora {HIDDEN}->{INTERMEDIATE} r{RANK} NF4 base", nf4_inputs,
                                 lambda x, w, a, b: K.lora_linear(x, w, a, b, 2.0),
                                 lambda x, w, a, b: K.lora_linear_reference(x, w, a, b, 2.0), (0, 2, 3))
    except ImportError:
        print("bitsandbytes not importable: lora_nf4 skipped")
    return table


def upstream_for(torch, outs: list) -> list:
    """The gradient fed to the outputs' backward: the same random tensors for every path."""
    torch.manual_seed(0)
    return [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]


def run_once(torch, fn: Callable, inputs: list, grad_of: Sequence[int], upstream: list | None = None):
    """(outputs, gradients of the grad_of inputs, the upstream gradient used)."""
    for i in grad_of:
        inputs[i].grad = None
    out = fn(*inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    upstream = upstream if upstream is not None else upstream_for(torch, outs)
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [inputs[i].grad for i in grad_of], upstream


def time_ms(torch, fn: Callable, inputs: list, grad_of: Sequence[int], repeats: int) -> tuple[float, float]:
    """Median ms of forward + backward and the peak CUDA memory (GiB) above what the inputs hold."""
    upstream = None
    for _ in range(3):
        upstream = run_once(torch, fn, inputs, grad_of, upstream)[2]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_once(torch, fn, inputs, grad_of, upstream)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def max_relative_difference(torch, ours: list, reference: list) -> float:
    worst = 0.0
    for a, b in zip(ours, reference):
        a, b = a.float(), b.float()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch = cuda_or_exit()
    torch.manual_seed(0)
    table = cases(torch, args.batch, args.seq)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch} x seq {args.seq}, "
          "bf16, forward + backward, median ms (speed-up of Triton: >1 faster)")
    results = []
    for key in args.kernels.split(","):
        if key not in table:
            continue
        case = table[key]
        inputs = case.make_inputs()
        ours = run_once(torch, case.triton_fn, inputs, case.grad_of)
        reference = run_once(torch, case.reference_fn, inputs, case.grad_of)
        difference = max_relative_difference(torch, ours[0] + ours[1], reference[0] + reference[1])
        triton_ms, triton_gib = time_ms(torch, case.triton_fn, inputs, case.grad_of, args.repeats)
        eager_ms, eager_gib = time_ms(torch, case.reference_fn, inputs, case.grad_of, args.repeats)
        row = {"kernel": key, "case": case.name, "max_rel_diff": difference, "triton_ms": triton_ms,
               "eager_ms": eager_ms, "triton_peak_gib": triton_gib, "eager_peak_gib": eager_gib}
        line = (f"{case.name:<36} triton {triton_ms:8.3f} ms ({triton_gib:5.2f} GiB)  eager {eager_ms:8.3f} ms "
                f"({eager_gib:5.2f} GiB) x{eager_ms / triton_ms:5.2f}")
        if not args.no_compile:
            compiled = torch.compile(case.reference_fn)
            try:
                compile_ms, compile_gib = time_ms(torch, compiled, inputs, case.grad_of, args.repeats)
                row.update(compile_ms=compile_ms, compile_peak_gib=compile_gib)
                line += f"  compile {compile_ms:8.3f} ms ({compile_gib:5.2f} GiB) x{compile_ms / triton_ms:5.2f}"
            except Exception as error:  # noqa: BLE001  (a baseline that does not compile is reported, not fatal)
                line += f"  compile failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        print(f"{line}  max rel diff {difference:.2e}", flush=True)
        results.append(row)
        del inputs
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
