"""Thin click CLI: each command parses options and calls one typed library function."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import click

from mt.errors import MtError, Terminated
from mt.quant.outtypes import CONVERT_CHOICES, CONVERTER_TYPES, OUT_TYPES

OUTTYPE_CHOICES = CONVERT_CHOICES

DEVICE_OPTION = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Where Q8_0/Q4_K/Q5_K/Q6_K are computed: auto uses a CUDA GPU when torch and triton can, else the CPU.")

SPLIT_SIZE_OPTION = click.option(
    "--split-max-size", default=None,
    help="Split a file into parts of at most this much tensor data: 2G, 500M (decimal units, as gguf-split).")
SPLIT_TENSORS_OPTION = click.option(
    "--split-max-tensors", type=int, default=None, help="Split a file into parts of at most this many tensors.")

IMATRIX_OPTION = click.option(
    "--imatrix", "imatrix", default=None, metavar="FILE",
    help="Importance matrix from mt imatrix or llama-imatrix (GGUF or legacy .dat) to weigh the quantization errors of "
         "llama.cpp's mixes (q4_k_m …), as llama-quantize --imatrix.")

ALLOW_NON_FINITE_OPTION = click.option(
    "--allow-non-finite", is_flag=True,
    help="Write NaN/Inf weights (and values too large for F16) as they are instead of refusing the model.")

DEQUANTIZED_BASE_OPTION = click.option(
    "--dequantized-base", is_flag=True,
    help="QLoRA: merge onto the base as bitsandbytes' NF4 round trip gives it (what the adapter was trained against), "
         "not onto the 16-bit weights.")


def _fail(message: str, code: int) -> None:
    click.echo(f"mt: error: {message}", err=True)
    sys.exit(code)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def run_reporting_errors(fn: Callable[[], Any]) -> Any:
    """MtError -> one line and exit 1; MT_DEBUG=1 re-raises for the traceback. SIGTERM and SIGHUP clean up as
    Ctrl-C does (exit 128 + the signal's number)."""
    handled = (signal.SIGTERM, signal.SIGHUP) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, _terminate) for sig in handled}
    try:
        return _run(fn)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except MtError as e:
        if os.environ.get("MT_DEBUG") == "1":
            raise
        rank = os.environ.get("RANK", "0")
        if rank != "0" and getattr(e, "same_on_every_rank", False):
            sys.exit(1)  # under torchrun: rank 0 prints this one
        _fail(e.one_line() if rank == "0" else f"(rank {rank}) {e.one_line()}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; no output was left behind", 130)
    except Terminated as e:
        _fail(f"stopped by {signal.Signals(e.signum).name}; no output was left behind", 128 + e.signum)
    except Exception as e:  # a bug in mt: still one line, and a way to see more
        if os.environ.get("MT_DEBUG") == "1":
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; please report it (MT_DEBUG=1 shows the traceback)", 1)


@click.group()
@click.version_option(package_name="mt")
def main() -> None:
    """mt: Hugging Face checkpoints to GGUF, byte-identical to llama.cpp's tools."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="GGUF file to write (with --format safetensors: the folder).")
@click.option("--outtype", type=click.Choice(OUTTYPE_CHOICES), default="auto", show_default=True)
@click.option("--format", "out_format", type=click.Choice(["gguf", "safetensors"]), default="gguf", show_default=True,
              help="safetensors: re-export the checkpoint as a Hugging Face folder, every tensor cast to --outtype bf16/f16/f32.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--vocab-only", is_flag=True, help="Write only the tokenizer and metadata.")
@click.option("--dry-run", is_flag=True, help="Print the tensor plan without reading tensor data.")
@click.option("--allow-pickle", is_flag=True, help="Load pytorch_model*.bin with torch.load(weights_only=True).")
@click.option("--adapter", type=click.Path(path_type=Path), default=None,
              help="PEFT LoRA adapter folder to merge in on the fly (same tensors as converting mt merge's output).")
@DEQUANTIZED_BASE_OPTION
@IMATRIX_OPTION
@ALLOW_NON_FINITE_OPTION
@click.option("--threads", type=int, default=None, help="Worker threads for quantization (default: all cores).")
@DEVICE_OPTION
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(src: Path, out: Path | None, outtype: str, out_format: str, force: bool, vocab_only: bool, dry_run: bool,
            allow_pickle: bool, adapter: Path | None, dequantized_base: bool, imatrix: str | None,
            allow_non_finite: bool, threads: int | None, device: str, quiet: bool, as_json: bool) -> None:
    """Convert the checkpoint SRC (a folder, or a Hub repository ORG/NAME[@REVISION]) to a GGUF file (or, with --format
    safetensors, a smaller safetensors folder)."""
    from mt.commands import convert_command, reexport_command

    if out is None and not dry_run:
        raise click.UsageError("-o/--output is required (unless --dry-run)")
    if out_format == "safetensors":
        if vocab_only or dry_run or imatrix:
            raise click.UsageError("--vocab-only, --dry-run and --imatrix apply to GGUF output only")
        assert out is not None
        run_reporting_errors(lambda: reexport_command(src, out, outtype, force=force, allow_pickle=allow_pickle, quiet=quiet,
                                                      as_json=as_json, adapter=adapter, dequantized_base=dequantized_base,
                                                      allow_non_finite=allow_non_finite))
        return
    run_reporting_errors(lambda: convert_command(src, out, outtype, force=force, vocab_only=vocab_only, dry_run=dry_run,
                                                 allow_pickle=allow_pickle, threads=threads, device=device, quiet=quiet,
                                                 as_json=as_json, adapter=adapter, dequantized_base=dequantized_base,
                                                 imatrix=imatrix, allow_non_finite=allow_non_finite))


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Folder to write.")
@click.option("--dtype", type=click.Choice(["bf16", "f16", "f32"]), default=None,
              help="Output dtype (default: each tensor keeps the base's dtype). The merge itself runs in float32.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard, e.g. 5GB, 500MB, 2GiB.")
@DEQUANTIZED_BASE_OPTION
@ALLOW_NON_FINITE_OPTION
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(base: Path, adapter: Path, out: Path, dtype: str | None, max_shard_size: str, dequantized_base: bool,
          allow_non_finite: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Merge the PEFT LoRA adapter ADAPTER into the checkpoint BASE (each a folder or a Hub repository
    ORG/NAME[@REVISION]): a Hugging Face folder transformers loads."""
    from mt.commands import merge_command

    run_reporting_errors(lambda: merge_command(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size,
                                               dequantized_base=dequantized_base, allow_non_finite=allow_non_finite,
                                               force=force, quiet=quiet, as_json=as_json))


@main.command("convert-lora")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", "base", type=click.Path(path_type=Path), required=True,
              help="The Hugging Face checkpoint folder the adapter was trained on (its GGUF is what llama.cpp runs).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="GGUF adapter file to write.")
@click.option("--outtype", type=click.Choice(list(CONVERTER_TYPES)), default="f32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_lora(adapter: Path, base: Path, out: Path, outtype: str, force: bool, quiet: bool, as_json: bool) -> None:
    """Write the PEFT LoRA folder ADAPTER as a GGUF LoRA adapter for llama.cpp (llama-cli --lora OUT)."""
    from mt.commands import convert_lora_command

    run_reporting_errors(lambda: convert_lora_command(adapter, base, out, outtype, force=force, quiet=quiet, as_json=as_json))


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="JSONL: rows with 'text', 'messages' (chat template; loss on assistant turns) or 'prompt'+'completion'.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="Adapter folder to write (PEFT format).")
@click.option("--qlora", is_flag=True, help="Train against the base quantized to NF4 by bitsandbytes.")
@click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=32.0, show_default=True, help="LoRA scale numerator (scale = alpha / r).")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--target", default="all-linear", show_default=True,
              help="all-linear, or a comma list of q,k,v,o,gate,up,down (or full names like q_proj); "
                   "Phi-3: qkv,o,gate_up,down.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=int, default=None, help="Passes over the data (instead of --max-steps).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True,
              help="Decay after the warmup.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Linear warmup steps (default: 3% of the steps).")
@click.option("--batch-tokens", type=int, default=4096, show_default=True,
              help="Tokens of one packed row (the most a process holds at once).")
@click.option("--grad-accum", type=int, default=1, show_default=True,
              help="Packed rows per process per optimizer step; under torchrun a step trains "
                   "WORLD_SIZE x --grad-accum rows.")
@click.option("--max-seq-len", type=int, default=2048, show_default=True, help="Longer rows are truncated (and counted).")
@click.option("--packing/--no-packing", default=True, show_default=True,
              help="Pack samples padding-free into one row (attention stays within each sample), or pad a batch.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard the model over the processes (FSDP2) instead of a whole copy on each (DDP).")
@click.option("--json-log", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help='One JSON line per step {"step","loss","lr","tokens_per_s"} to this file (- for stdout).')
@click.option("--save-every", type=int, default=None, metavar="N",
              help="Every N steps write a checkpoint --resume takes to OUT.checkpoints/step-N (the latest is kept; "
                   "removed when the run completes).")
@click.option("--resume", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Continue from an adapter folder mt finetune wrote (its weights, optimizer state and step count).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the LoRA init and the data order.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: a CUDA GPU when torch sees one.")
@click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]), default="auto", show_default=True,
              help="Base weights and compute dtype (auto: bf16 on a GPU that has it, else f32).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's; 1 is fastest for tiny models on a busy machine).")
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch", "off"]), default="auto", show_default=True,
              help="mt's Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU, LoRA linear, chunked loss): auto = on a CUDA GPU; "
                   "torch = their PyTorch references; off = plain transformers + PEFT.")
@click.option("--force", is_flag=True, help="Replace OUT (and the --json-log file) if they exist.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def finetune(base: Path, data: Path, out: Path, qlora: bool, lora_r: int, lora_alpha: float, lora_dropout: float,
             target: str, max_steps: int | None, epochs: int | None, lr: float, schedule: str, warmup_steps: int | None,
             batch_tokens: int, grad_accum: int, max_seq_len: int, packing: bool, grad_checkpointing: bool, fsdp: bool,
             json_log: Path | None, save_every: int | None, resume: Path | None, seed: int, device: str, dtype: str, threads: int | None,
             kernels: str, force: bool, quiet: bool) -> None:
    """Train a LoRA (or QLoRA) adapter for the checkpoint BASE on --data; writes a PEFT adapter folder."""
    from mt.commands import finetune_command
    from mt.finetune.lora import LoraOptions
    from mt.finetune.trainer import TrainOptions

    if max_steps is not None and epochs is not None:
        raise click.UsageError("pass --max-steps or --epochs, not both")
    lora = LoraOptions(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target=target, qlora=qlora)
    options = TrainOptions(base=base, data=data, output=out, lora=lora, max_steps=max_steps, epochs=epochs, lr=lr,
                           schedule=schedule, warmup_steps=warmup_steps, batch_tokens=batch_tokens, grad_accum=grad_accum,
                           max_seq_len=max_seq_len, packing=packing, grad_checkpointing=grad_checkpointing,
                           seed=seed, device=device, dtype=dtype, threads=threads, json_log=json_log,
                           save_every=save_every, resume=resume, force=force, fsdp=fsdp, kernels=kernels)
    run_reporting_errors(lambda: finetune_command(options, quiet=quiet))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("file_type")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the base type (no Q4_K_M-style mix).")
@click.option("--output-tensor-type", default=None, help="Type for output.weight (e.g. q8_0).")
@click.option("--token-embedding-type", default=None, help="Type for token_embd.weight.")
@IMATRIX_OPTION
@ALLOW_NON_FINITE_OPTION
@click.option("--threads", type=int, default=None, help="Worker threads (default: all cores).")
@DEVICE_OPTION
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--quiet", is_flag=True)
def quantize(src: Path, out: Path, file_type: str, pure: bool, output_tensor_type: str | None,
             token_embedding_type: str | None, imatrix: str | None, allow_non_finite: bool, threads: int | None,
             device: str, force: bool, quiet: bool) -> None:
    """Quantize an F32/F16/BF16 GGUF (SRC) to FILE_TYPE (Q4_K_M, Q5_K_M, Q4_K_S, Q5_K_S, Q6_K, Q8_0, Q4_0, Q5_0, Q5_1)."""
    from mt.commands import quantize_command

    run_reporting_errors(lambda: quantize_command(src, out, file_type, pure=pure, output_tensor_type=output_tensor_type,
                                                  token_embedding_type=token_embedding_type, imatrix=imatrix, threads=threads,
                                                  device=device, force=force, quiet=quiet,
                                                  allow_non_finite=allow_non_finite))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="UTF-8 calibration text (e.g. wiki.train.raw or a sample of the finetune's data).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="imatrix file to write (llama-imatrix's GGUF format; .dat or --format dat: the legacy one).")
@click.option("--adapter", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="PEFT LoRA adapter folder merged in on the fly.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (llama-imatrix -c).")
@click.option("--chunks", type=int, default=None, help="Chunks to run (default: all the text holds).")
@click.option("--batch", type=int, default=2048, show_default=True,
              help="Tokens per forward pass: chunks side by side, or a chunk in pieces (llama-imatrix -b).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs: auto uses a CUDA GPU when torch sees one.")
@click.option("--dtype", type=click.Choice(["auto", "f32", "bf16"]), default="auto", show_default=True,
              help="Precision of the model's weights and activations (auto: f32 on the CPU, bf16 on a GPU).")
@click.option("--from", "from_gguf", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The GGUF converted from SRC that the matrix is for: its tokenizer is used and its tensors checked.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat"]), default=None,
              help="File format (default: dat for a .dat name, else gguf).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix(src: Path, text_file: Path, out: Path, adapter: Path | None, ctx: int, chunks: int | None, batch: int,
            device: str, dtype: str, from_gguf: Path | None, fmt: str | None, force: bool, quiet: bool,
            as_json: bool) -> None:
    """Compute an importance matrix for SRC (a Hugging Face folder or Hub id) by running it over calibration text,
    as llama-imatrix does from a GGUF; mt quantize/convert/release take it with --imatrix."""
    from mt.commands import imatrix_command
    from mt.imatrix.compute import ImatrixOptions

    options = ImatrixOptions(ctx=ctx, chunks=chunks, batch=batch, device=device, dtype=dtype, adapter=adapter,
                             from_gguf=from_gguf)
    run_reporting_errors(lambda: imatrix_command(src, text_file, out, options, fmt=fmt, force=force, quiet=quiet,
                                                 as_json=as_json))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--memory", is_flag=True, help="What running the GGUF takes: weights + KV cache at 2k/8k/32k and its maximum context.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None, help="With --memory: this context only.")
def inspect(path: Path, as_json: bool, memory: bool, n_ctx: int | None) -> None:
    """Show a GGUF file's metadata and tensors, or a checkpoint folder's summary."""
    from mt.inspect import inspect_path, memory_report

    if n_ctx is not None and not memory:
        raise click.UsageError("--ctx goes with --memory")
    report = run_reporting_errors(lambda: memory_report(path, n_ctx) if memory else inspect_path(path))
    click.echo(json.dumps(report, indent=2, default=str) if as_json else report["text"])


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dist", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write the release into (it appears only when every file is written and verified).")
@click.option("--quants", default="f16,q8_0,q4_k_m", show_default=True,
              help="Comma-separated types, each written once: " + ", ".join(OUT_TYPES) + ".")
@click.option("--name", default=None, help="File name stem: NAME-Q4_K_M.gguf (default: the source folder's name).")
@click.option("--adapter", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="PEFT LoRA adapter folder merged in on the fly.")
@DEQUANTIZED_BASE_OPTION
@click.option("--imatrix", "imatrix", default=None, metavar="FILE|auto",
              help="Importance matrix for llama.cpp's mixes (q4_k_m, iq2_xs …): a file from llama-imatrix or mt imatrix, "
                   "or auto to compute it from --calibration first (shipped as imatrix.gguf).")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --imatrix auto: the UTF-8 text the matrix is computed over.")
@click.option("--calibration-ctx", type=int, default=512, show_default=True, help="With --imatrix auto: tokens per chunk.")
@click.option("--calibration-chunks", type=int, default=None,
              help="With --imatrix auto: chunks to run (default: all the text holds).")
@ALLOW_NON_FINITE_OPTION
@SPLIT_SIZE_OPTION
@SPLIT_TENSORS_OPTION
@click.option("--mmproj-type", type=click.Choice(["f16", "bf16", "f32", "q8_0"]), default="f16", show_default=True,
              help="A vision-language model's projector file (mmproj-NAME-TYPE.gguf), shipped once beside the files.")
@click.option("--no-verify", is_flag=True, help="Do not run mt verify on each file.")
@click.option("--verify-text", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="UTF-8 text for verify's logits checks (default: the built-in corpus).")
@click.option("--max-kld", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail the release when a file's mean KLD from the source exceeds this.")
@click.option("--threads", type=int, default=None, help="Worker threads for quantization (default: all cores).")
@DEVICE_OPTION
@click.option("--push", "push_repo", default=None, metavar="ORG/NAME",
              help="Upload the release to this Hub model repository (created if missing) once every file passed verify.")
@click.option("--private", is_flag=True, help="With --push: create the repository private.")
@click.option("--revision", default=None, help="With --push: the branch to upload to (created from main).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def release(src: Path, dist: Path, quants: str, name: str | None, adapter: Path | None, dequantized_base: bool,
            imatrix: str | None, calibration: Path | None, calibration_ctx: int, calibration_chunks: int | None,
            allow_non_finite: bool, split_max_size: str | None, split_max_tensors: int | None, mmproj_type: str,
            no_verify: bool, text_file: Path | None,
            max_kld: float | None, threads: int | None, device: str, push_repo: str | None, private: bool,
            revision: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Write every type in --quants from one read of the checkpoint SRC (a folder, or a Hub repository
    ORG/NAME[@REVISION]) into the -o folder, each file verified."""
    from mt.commands import release_command

    if push_repo is not None and no_verify:
        raise click.UsageError("--push uploads verified files only: drop --no-verify")
    if (private or revision) and push_repo is None:
        raise click.UsageError("--private and --revision go with --push")
    run_reporting_errors(lambda: release_command(
        src, dist, quants, name=name, adapter=adapter, dequantized_base=dequantized_base, imatrix=imatrix,
        calibration=calibration, calibration_ctx=calibration_ctx, calibration_chunks=calibration_chunks,
        allow_non_finite=allow_non_finite, split_max_size=split_max_size, split_max_tensors=split_max_tensors,
        mmproj_type=mmproj_type, verify=not no_verify,
        text_file=text_file, max_kld=max_kld, threads=threads, device=device, force=force, quiet=quiet, as_json=as_json,
        push_to=push_repo, private=private, revision=revision))


@main.command()
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--merge", is_flag=True, help="SRC is a split file's first part: write it whole to OUT.")
@SPLIT_SIZE_OPTION
@SPLIT_TENSORS_OPTION
@click.option("--force", is_flag=True, help="Replace existing output files.")
def split(src: Path, out: Path, merge: bool, split_max_size: str | None, split_max_tensors: int | None,
          force: bool) -> None:
    """Split the GGUF SRC into parts OUT-00001-of-0000N.gguf … as llama.cpp's gguf-split does (by default 128
    tensors a part), or with --merge write the split file whose first part is SRC back as the one file OUT."""
    from mt.commands import split_command

    run_reporting_errors(lambda: split_command(src, out, merge=merge, split_max_size=split_max_size,
                                               split_max_tensors=split_max_tensors, force=force))


@main.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("--reference", "reference", type=click.Path(path_type=Path), required=True,
              help="The Hugging Face folder the GGUF was made from.")
@click.option("--text", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="UTF-8 text to tokenize and run through both models (default: the built-in multilingual corpus).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens of text for the logits check (at most --ctx).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=512, show_default=True, help="llama.cpp context size.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the report as JSON to this file ('-': print it instead of the summary).")
@click.option("--markdown", "markdown_out", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the report as markdown (for a model card).")
@click.option("--max-kld", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail when the file's mean KLD from the source exceeds this (default: reported, not judged).")
@click.option("--min-top1", type=click.FloatRange(min=0, max=1), default=None,
              help="Fail when the file's top-1 agreement with the source is below this fraction (0..1).")
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False),
              help="The importance matrix the file was quantized with (its tensors are then checked exactly).")
@click.option("--reference-layers", type=click.IntRange(min=1), default=None,
              help="Layers the 16-bit reference conversion runs (default: all up to a 1 GiB reference, else the "
                   "first layers holding one of each kind, at least 2).")
@click.option("--adapter", type=click.Path(path_type=Path, file_okay=False),
              help="PEFT adapter the GGUF was merged from: merged into the reference.")
@click.option("--allow-pickle", is_flag=True, help="A reference of pytorch_model*.bin: load it with torch.load(weights_only=True).")
@click.option("--force", is_flag=True, help="Overwrite existing report files.")
def verify(gguf: Path, reference: Path, text_file: Path | None, max_tokens: int, n_ctx: int, json_out: Path | None,
           markdown_out: Path | None, max_kld: float | None, min_top1: float | None, imatrix: Path | None,
           reference_layers: int | None, adapter: Path | None, allow_pickle: bool, force: bool) -> None:
    """Prove GGUF is mt's conversion of its source (metadata, vocabulary, every tensor's bytes, tokenization, the
    conversion run against transformers) and report its divergence from the source. Exit 0 pass, 1 fail."""
    from mt.commands import verify_command
    from mt.verify.verify import VerifyOptions

    options = VerifyOptions(max_tokens=max_tokens, n_ctx=n_ctx, max_kld=max_kld, min_top1=min_top1, adapter=adapter,
                            imatrix=imatrix, reference_layers=reference_layers, allow_pickle=allow_pickle)
    passed = run_reporting_errors(lambda: verify_command(
        gguf, reference, options, text_file=text_file, json_out=json_out, markdown_out=markdown_out, force=force))
    sys.exit(0 if passed else 1)


@main.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Modelfile to write (default: print it).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def modelfile(gguf: Path, out: Path | None, force: bool) -> None:
    """Write an Ollama Modelfile for GGUF: its chat template as a Go template proven to render the same text, the stop
    tokens, the default system prompt, the licence."""
    from mt.commands import modelfile_command

    run_reporting_errors(lambda: modelfile_command(gguf, out, force=force))


@main.command()
@click.argument("tada", type=click.Path(path_type=Path))
@click.option("--text", required=True, help="What to say.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="WAV file to write (24 kHz mono).")
@click.option("--voice", type=click.Path(path_type=Path), default=None,
              help="Voice prompt: a saved EncoderOutput of HumeAI's encoder, or mt's .npz of the same arrays.")
@click.option("--acoustic", type=click.Path(path_type=Path), default=None,
              help="The acoustic file (default: <stem>-acoustic.gguf beside TADA).")
@click.option("--codec", type=click.Path(path_type=Path), default=None,
              help="The codec decoder GGUF (default: <stem>-codec.gguf beside TADA).")
@click.option("--flow-steps", type=click.IntRange(1, 1000), default=10, show_default=True, help="Euler steps of the flow head.")
@click.option("--cfg", type=float, default=1.6, show_default=True, help="Classifier-free guidance of the acoustic dims.")
@click.option("--duration-cfg", type=float, default=1.0, show_default=True, help="Guidance of the duration dims.")
@click.option("--noise-temperature", type=float, default=0.9, show_default=True, help="Scale of the flow's starting noise.")
@click.option("--negative", type=click.Choice(["step", "zero"]), default="step", show_default=True,
              help="Guidance's negative condition: a second sequence of pad tokens (step) or zeros.")
@click.option("--no-normalize", is_flag=True, help="Tokenize the text as given (no punctuation and case rewriting).")
@click.option("--head-dtype", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
              help="What the flow head computes in: bf16 is several times faster on CPUs with bf16 instructions.")
@click.option("--seed", type=int, default=None, help="Seed of the flow's noise (default: a fresh one).")
@click.option("--threads", type=int, default=None, help="llama.cpp threads (default: its own choice).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def speak(tada: Path, text: str, out: Path, voice: Path | None, acoustic: Path | None, codec: Path | None,
          flow_steps: int, cfg: float, duration_cfg: float, noise_temperature: float, negative: str, no_normalize: bool,
          head_dtype: str, seed: int | None, threads: int | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Say --text with the TADA model mt converted (TADA, with its -acoustic.gguf and -codec.gguf beside it): a
    24 kHz mono wav."""
    from mt.commands import speak_command
    from mt.speak.acoustic import FlowOptions
    from mt.speak.speak import SpeakOptions

    options = SpeakOptions(FlowOptions(flow_steps=flow_steps, acoustic_cfg=cfg, duration_cfg=duration_cfg,
                                       noise_temperature=noise_temperature), negative=negative,
                           normalize=not no_normalize, threads=threads, head_dtype=head_dtype)
    run_reporting_errors(lambda: speak_command(tada, text, out, acoustic=acoustic, codec=codec, voice=voice,
                                               options=options, seed=seed, force=force, quiet=quiet, as_json=as_json))


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Where to write (default: a temp folder).")
@click.option("--tiny", is_flag=True, help="Use the built-in tiny random model (no download).")
def demo(workdir: Path | None, tiny: bool) -> None:
    """Release SmolLM2-135M-Instruct as F16, Q8_0 and Q4_K_M, each verified, then ask the Q4_K_M file a question."""
    from mt.demo import run_demo

    sys.exit(0 if run_reporting_errors(lambda: run_demo(workdir, tiny)) else 1)


if __name__ == "__main__":
    main()
