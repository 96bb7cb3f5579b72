"""mt imatrix: the model (an adapter merged in) run by transformers over the calibration text, chunk by chunk as
llama-imatrix runs it, and the sums written in llama-imatrix's GGUF (or legacy .dat) format."""

from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mt.convert.arch.base import find_key
from mt.convert.arch.common import CONTEXT_LENGTH_KEYS
from mt.convert.convert import convert, open_model
from mt.convert.plan import main_file_tensors
from mt.errors import DeviceUnavailable, MtError
from mt.imatrix.chunks import cut_chunks, tokenize
from mt.imatrix.collect import Collector
from mt.io.atomic import atomic_path, check_output
from mt.io.checkpoint import Checkpoint
from mt.io.gguf_in import read_header
from mt.quant.imatrix import ImatrixSums, write_imatrix_dat, write_imatrix_gguf
from mt.verify.layered import decoder_model

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mt.convert.arch.base import Architecture

Progress = Callable[[int, int], None]  # (chunks done, chunks in all)
FORMATS = {"gguf": write_imatrix_gguf, "dat": write_imatrix_dat}


@dataclass(frozen=True)
class ImatrixOptions:
    ctx: int = 512
    chunks: int | None = None  # all the text holds
    batch: int = 2048  # tokens per forward: several chunks side by side, or a chunk in pieces
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (f32 on the CPU, bf16 on a GPU) | f32 | bf16
    adapter: Path | None = None
    from_gguf: Path | None = None  # the GGUF the matrix is for: its tokenizer, its tensors checked


@dataclass(frozen=True)
class ImatrixRun:
    imatrix: ImatrixSums
    text_tokens: int
    chunks: int
    device: str
    dtype: str


def imatrix_command_run(src: Path, text_path: Path, out: Path, options: ImatrixOptions, *, fmt: str | None = None,
                        force: bool = False, progress: Progress | None = None) -> ImatrixRun:
    """Compute the importance matrix of `src` over the text in `text_path` and write it to `out` (format from
    `fmt`, else .dat for a .dat name, else GGUF); nothing is written unless it all succeeds."""
    fmt = fmt or ("dat" if out.suffix == ".dat" else "gguf")
    if fmt not in FORMATS:
        raise MtError(f"unknown imatrix format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    check_output(out, force)
    run = compute_imatrix(src, read_calibration(text_path), str(text_path), options, progress)
    with atomic_path(out) as tmp:
        FORMATS[fmt](tmp, run.imatrix)
    return run


def read_calibration(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MtError(f"calibration text {path} is not UTF-8", "pass a UTF-8 text file to --text") from None
    except OSError as e:
        raise MtError(f"cannot read calibration text {path} ({e.strerror})", "check the --text path") from None
    if not text.strip():
        raise MtError(f"calibration text {path} is empty", "pass a text of at least two contexts' worth of tokens "
                      "(1024 tokens for --ctx 512), e.g. wiki.train.raw")
    return text


def compute_imatrix(src: Path, text: str, dataset: str, options: ImatrixOptions,
                    progress: Progress | None = None) -> ImatrixRun:
    _check_sizes(options)
    ckpt, arch = open_model(src, options.adapter)
    _check_context(ckpt, options.ctx)
    matrices = quantized_matrices(ckpt, arch)
    if options.from_gguf is not None:
        _check_fits(options.from_gguf, matrices)
    chunks, n_tokens = _chunks(src, text, dataset, options)
    device = resolve_device(options.device)
    dtype = options.dtype if options.dtype != "auto" else ("f32" if device == "cpu" else "bf16")
    sums, counts = _collect(ckpt, matrices, chunks, options.batch, device, dtype, progress)
    return ImatrixRun(ImatrixSums(sums, counts, dataset, options.ctx), n_tokens, len(chunks), device, dtype)


def _check_sizes(options: ImatrixOptions) -> None:
    if options.ctx < 1 or options.batch < 1 or (options.chunks is not None and options.chunks < 1):
        raise MtError("--ctx, --batch and --chunks must be positive", "pass positive numbers")
    if options.batch > options.ctx and options.batch % options.ctx:
        raise MtError(f"--batch {options.batch} is above --ctx {options.ctx} but not a multiple of it",
                      "choose a batch of at most one context, or a whole number of contexts")
    if options.dtype not in ("auto", "f32", "bf16"):
        raise MtError(f"unknown --dtype {options.dtype!r}", "choose auto, f32 or bf16")


def _check_context(ckpt: Checkpoint, n_ctx: int) -> None:
    trained = find_key(ckpt.config, CONTEXT_LENGTH_KEYS)
    if isinstance(trained, int) and n_ctx > trained:
        raise MtError(f"--ctx {n_ctx} is longer than the model's context ({trained} tokens)",
                      f"choose --ctx {min(512, trained)} (at most {trained})")


def resolve_device(name: str) -> str:
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise DeviceUnavailable(f"unknown device {name!r}", "choose auto, cpu or cuda")
    usable = bool(glob.glob("/dev/nvidia[0-9]*")) and torch.cuda.is_available()
    if name == "cuda" and not usable:
        raise DeviceUnavailable("--device cuda: torch sees no CUDA device", "install a CUDA build of torch, or use --device cpu")
    return "cuda" if name != "cpu" and usable else "cpu"


def _chunks(src: Path, text: str, dataset: str, options: ImatrixOptions) -> tuple[np.ndarray, int]:
    """The chunks, tokenized by llama.cpp with the vocabulary of --from's GGUF or of mt's conversion of `src`."""
    if options.from_gguf is not None:
        vocab = tokenize(options.from_gguf, text)
    else:
        with tempfile.TemporaryDirectory(prefix="mt-imatrix-") as tmp:
            vocab_file = Path(tmp) / "vocab.gguf"
            convert(src, vocab_file, "f32", vocab_only=True, adapter=options.adapter)
            vocab = tokenize(vocab_file, text)
    return cut_chunks(vocab, options.ctx, options.chunks, dataset), int(vocab.tokens.size)


def quantized_matrices(ckpt: Checkpoint, arch: Architecture) -> dict[str, tuple[str, int]]:
    """checkpoint name -> (GGUF name, columns) of every `blk.*` matrix of the main file."""
    return {hf: (gguf, int(ref.shape[1])) for hf, gguf, ref in main_file_tensors(arch, ckpt.tensors)
            if gguf.startswith("blk.") and gguf.endswith(".weight") and len(ref.shape) == 2}


def quantized_layers(model: nn.Module, prefix: str, matrices: dict[str, tuple[str, int]]) -> dict[str, nn.Linear]:
    """GGUF name -> the linear layer computing with it, for each of `matrices`."""
    from torch import nn

    layers = {matrices[f"{name}.weight"][0]: module for name, module in model.named_modules(prefix=prefix)
              if isinstance(module, nn.Linear) and f"{name}.weight" in matrices}
    if missing := sorted({gguf for gguf, _ in matrices.values()} - layers.keys()):
        raise MtError(f"transformers' {type(model).__name__} runs {missing[0]} (and {len(missing) - 1} more) outside a "
                      "linear layer mt can watch", "compute this model's imatrix with llama-imatrix")
    return layers


def _collect(ckpt: Checkpoint, matrices: dict[str, tuple[str, int]], chunks: np.ndarray, batch: int, device: str,
             dtype: str, progress: Progress | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    import torch

    model, prefix = decoder_model(ckpt, {"f32": torch.float32, "bf16": torch.bfloat16}[dtype], device)
    collector = Collector(quantized_layers(model, prefix, matrices))
    n_ctx = chunks.shape[1]
    per_forward = max(1, batch // n_ctx)
    try:
        with torch.inference_mode():
            for first in range(0, len(chunks), per_forward):
                ids = torch.from_numpy(chunks[first:first + per_forward]).to(device)
                _run_chunks(model, ids, min(batch, n_ctx), collector)
                if progress:
                    progress(min(first + per_forward, len(chunks)), len(chunks))
    finally:
        collector.close()
    return collector.result()


def _run_chunks(model: nn.Module, ids: torch.Tensor, piece: int, collector: Collector) -> None:
    """Chunks side by side, each from position 0, `piece` tokens at a time (a KV cache carries the earlier pieces)."""
    from transformers import DynamicCache

    if piece >= ids.shape[1]:
        model(input_ids=ids, use_cache=False)
        collector.step_done()
        return
    cache = DynamicCache()
    for start in range(0, ids.shape[1], piece):
        model(input_ids=ids[:, start:start + piece], past_key_values=cache, use_cache=True)
        collector.step_done()


def _check_fits(gguf: Path, matrices: dict[str, tuple[str, int]]) -> None:
    """Every matrix is a tensor of `gguf` with as many columns (ggml's ne0)."""
    widths = {t.name: t.shape[0] for t in read_header(gguf).tensors if t.shape}
    for name, columns in sorted(matrices.values()):
        if widths.get(name) != columns:
            raise MtError(f"--from {gguf} has no tensor {name} of {columns} columns, which the model computes with",
                          "pass --from the GGUF converted from this model")

