"""Command bodies behind the CLI: typed functions that print what they did."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import click

from mt.convert.convert import convert, load
from mt.errors import MtError
from mt.io.hub import hub_source, resolve_folder
from mt.convert.plan import TensorPlan, companion_plans
from mt.quant.types import set_threads

T = TypeVar("T")

if TYPE_CHECKING:
    from mt.imatrix.compute import ImatrixOptions
    from mt.finetune.trainer import StepLog, TrainOptions
    from mt.verify.verify import VerifyOptions
    from mt.speak.speak import SpeakOptions


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def ggml_shape(shape: tuple[int, ...]) -> str:
    return "{" + ", ".join(str(d) for d in reversed(shape)) + "}"


def plan_rows(plan: TensorPlan) -> list[dict]:
    return [
        {"name": e.name, "shape": list(reversed(e.shape)), "type": e.qtype.name, "bytes": e.nbytes, "source": e.source_name}
        for e in plan.entries
    ]


def print_plan(plan: TensorPlan) -> None:
    width = max((len(e.name) for e in plan.entries), default=10)
    for e in plan.entries:
        click.echo(f"{e.name:<{width}}  {e.qtype.name:<5} {ggml_shape(e.shape):<18} {format_bytes(e.nbytes):>10}  <- {e.source_name}")
    click.echo(f"{len(plan.entries)} tensors, {format_bytes(plan.nbytes)} of tensor data, file type {plan.file_type.name}")


def with_progress(show_bar: bool, run: Callable[[Callable[[int, int], None] | None], T],
                  label: str = "writing") -> tuple[T, float]:
    """`run(progress)` with a progress bar on stderr when `show_bar`; its result and the seconds it took."""
    bar = ProgressBar(label) if show_bar and sys.stderr.isatty() else None
    start = time.perf_counter()
    try:
        result = run(bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    return result, time.perf_counter() - start


def convert_command(src: Path, out: Path | None, outtype: str, *, force: bool, vocab_only: bool, dry_run: bool,
                    allow_pickle: bool, threads: int | None, quiet: bool, as_json: bool, device: str = "auto",
                    adapter: Path | None = None, dequantized_base: bool = False, imatrix: str | None = None,
                    allow_non_finite: bool = False) -> None:
    src, adapter = resolve_folder(src, allow_pickle), adapter and resolve_folder(adapter)
    if threads:
        set_threads(threads)
    if dry_run:
        ckpt, arch, plan = load(src, outtype, allow_pickle, adapter, dequantized_base, imatrix)
        companions = companion_plans(ckpt, arch, outtype)
        if as_json:
            click.echo(json.dumps({"arch": arch.gguf_arch, "file_type": plan.file_type.name,
                                   "tensor_bytes": plan.nbytes, "tensors": plan_rows(plan),
                                   "companions": [{"suffix": c.suffix, "arch": c.gguf_arch, "file_type": p.file_type.name,
                                                   "tensor_bytes": p.nbytes, "tensors": plan_rows(p)} for c, p in companions]},
                              indent=2))
        else:
            print_plan(plan)
            for companion, companion_plan in companions:
                click.echo(f"companion {'<output stem>' + companion.suffix}.gguf ({companion.gguf_arch}):")
                print_plan(companion_plan)
        return
    assert out is not None
    result, elapsed = with_progress(not quiet and not as_json, lambda progress: convert(
        src, out, outtype, force=force, vocab_only=vocab_only, allow_pickle=allow_pickle, progress=progress,
        device=device, adapter=adapter, dequantized_base=dequantized_base, imatrix=imatrix,
        allow_non_finite=allow_non_finite))
    summary = {"output": str(result.output), "arch": result.arch, "file_type": result.plan.file_type.name,
               "tensors": 0 if vocab_only else len(result.plan.entries), "bytes": result.output.stat().st_size,
               "seconds": round(elapsed, 3), "tokenizer": result.vocab.model if result.vocab else None,
               "pre_tokenizer": result.vocab.pre if result.vocab else None,
               "companions": [{"output": str(c.path), "arch": c.companion.gguf_arch, "tensors": len(c.plan.entries),
                               "bytes": c.path.stat().st_size} for c in result.companions],
               "mmproj": None if result.mmproj is None else {
                   "output": str(result.mmproj.path), "file_type": result.mmproj.plan.file_type.name,
                   "tensors": len(result.mmproj.plan.entries), "bytes": result.mmproj.path.stat().st_size}}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(f"wrote {summary['output']}: {summary['arch']} {summary['file_type']}, {summary['tensors']} tensors, "
                   f"{format_bytes(summary['bytes'])} in {elapsed:.1f} s (tokenizer {summary['tokenizer']}/{summary['pre_tokenizer']})")
        for c in summary["companions"]:
            click.echo(f"wrote {c['output']}: {c['arch']}, {c['tensors']} tensors, {format_bytes(c['bytes'])}")
        if (m := summary["mmproj"]) is not None:
            click.echo(f"wrote {m['output']}: clip (vision projector) {m['file_type']}, {m['tensors']} tensors, "
                       f"{format_bytes(m['bytes'])}")


def reexport_command(src: Path, out: Path, outtype: str, *, force: bool, allow_pickle: bool, quiet: bool, as_json: bool,
                     adapter: Path | None = None, dequantized_base: bool = False, allow_non_finite: bool = False) -> None:
    from mt.convert.reexport import reexport

    src, adapter = resolve_folder(src, allow_pickle), adapter and resolve_folder(adapter)
    result, elapsed = with_progress(not quiet and not as_json, lambda progress: reexport(
        src, out, outtype, force=force, allow_pickle=allow_pickle, adapter=adapter,
        dequantized_base=dequantized_base, allow_non_finite=allow_non_finite, progress=progress))
    if as_json:
        click.echo(json.dumps({"output": str(out), "dtype": result.dtype, "tensors": result.tensors, "bytes": result.nbytes,
                               "shards": result.shards, "seconds": round(elapsed, 3)}))
    elif not quiet:
        click.echo(f"wrote {out}: {result.tensors} tensors as {result.dtype}, {format_bytes(result.nbytes)} in "
                   f"{result.shards} shard(s), {elapsed:.1f} s")


def convert_lora_command(adapter: Path, base: Path, out: Path, outtype: str, *, force: bool, quiet: bool,
                         as_json: bool) -> None:
    from mt.merge.lora_gguf import convert_lora

    adapter, base = resolve_folder(adapter), resolve_folder(base)
    start = time.perf_counter()
    result = convert_lora(adapter, base, out, outtype, force=force)
    types = Counter(t.qtype.name for t in result.tensors)
    summary = {"output": str(result.output), "arch": result.arch, "alpha": result.alpha,
               "pairs": len(result.tensors) // 2, "types": dict(sorted(types.items())),
               "bytes": result.output.stat().st_size, "seconds": round(time.perf_counter() - start, 3)}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        mix = ", ".join(f"{n} {name}" for name, n in summary["types"].items())
        click.echo(f"wrote {out}: {result.arch} LoRA adapter, alpha {result.alpha:g}, {summary['pairs']} lora_a/lora_b pairs "
                   f"({mix}), {format_bytes(summary['bytes'])} in {summary['seconds']:.1f} s")


def tensor_type_option(name: str | None) -> "GGMLQuantizationType | None":
    from gguf import GGMLQuantizationType

    if name is None:
        return None
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise MtError(f"unknown tensor type {name!r}", "use a GGML type name such as q8_0, q6_k, f16") from None


def quantize_command(src: Path, out: Path, file_type: str, *, pure: bool, output_tensor_type: str | None,
                     token_embedding_type: str | None, threads: int | None, force: bool, quiet: bool,
                     imatrix: str | None = None, device: str = "auto", allow_non_finite: bool = False) -> None:
    from mt.quant.mix import MixOptions
    from mt.quant.quantize import quantize_gguf

    if threads:
        set_threads(threads)
    options = MixOptions(pure=pure, output_tensor_type=tensor_type_option(output_tensor_type),
                         token_embedding_type=tensor_type_option(token_embedding_type))
    result, elapsed = with_progress(not quiet, lambda progress: quantize_gguf(
        src, out, file_type, options=options, force=force, progress=progress, imatrix=imatrix, device=device,
        allow_non_finite=allow_non_finite))
    if not quiet:
        counts = Counter(t.name for t in result.types.values())
        mix = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        click.echo(f"wrote {out}: {result.file_type.name}, {format_bytes(out.stat().st_size)} in "
                   f"{elapsed:.1f} s ({mix})")


def merge_command(base: Path, adapter: Path, out: Path, *, dtype: str | None, max_shard_size: str,
                  dequantized_base: bool, force: bool, quiet: bool, as_json: bool,
                  allow_non_finite: bool = False) -> None:
    from mt.merge.merge import merge

    base, adapter = resolve_folder(base), resolve_folder(adapter)
    result, elapsed = with_progress(not quiet and not as_json, lambda progress: merge(
        base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, force=force,
        dequantized_base=dequantized_base, allow_non_finite=allow_non_finite, progress=progress))
    if as_json:
        click.echo(json.dumps({"output": str(out), "tensors": result.tensors, "merged": result.merged,
                               "bytes": result.nbytes, "shards": result.shards, "seconds": round(elapsed, 3)}))
    elif not quiet:
        click.echo(f"wrote {out}: {result.tensors} tensors ({result.merged} changed by the adapter), "
                   f"{format_bytes(result.nbytes)} in {result.shards} shard(s), {elapsed:.1f} s")


class ProgressBar:
    """A bar on stderr (bytes written, by default), opened when the total is known."""

    def __init__(self, label: str = "writing") -> None:
        self._bar = None
        self._label = label

    def update(self, n: int, total: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self._label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def verify_command(gguf: Path, reference: Path, options: VerifyOptions, *, text_file: Path | None,
                   json_out: Path | None, markdown_out: Path | None, force: bool) -> bool:
    """Run every check, print the summary (or JSON with --json -), write the reports; returns the verdict."""
    from mt.io.atomic import atomic_path, check_output
    from mt.verify.verify import verify

    files = {p: render for p, render in ((json_out, "to_json"), (markdown_out, "to_markdown")) if p and str(p) != "-"}
    for path in files:
        check_output(path, force)
    if text_file:
        options = replace(options, text=_read_text(text_file))
    reference = resolve_folder(reference, options.allow_pickle)
    if options.adapter is not None:
        options = replace(options, adapter=resolve_folder(options.adapter))
    report = verify(gguf, reference, options)
    click.echo(report.to_json() if str(json_out) == "-" else report.to_text())
    for path, render in files.items():
        with atomic_path(path) as tmp:
            tmp.write_text(getattr(report, render)(), encoding="utf-8")
    return report.passed


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MtError(f"{path} is not UTF-8 text", "pass a UTF-8 text file to --text") from None
    except OSError as e:
        raise MtError(f"cannot read {path} ({e.strerror})", "check the --text path") from None


def finetune_command(options: TrainOptions, *, quiet: bool) -> None:
    from mt.finetune.trainer import finetune

    quiet = quiet or os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 reports for all
    progress = TrainProgress() if not quiet and sys.stderr.isatty() else None
    warn = (lambda message: click.echo(f"mt: warning: {message}", err=True)) if not quiet else None
    info = (lambda message: click.echo(message, err=True)) if not quiet else None
    try:
        result = finetune(options, on_step=progress.update if progress else None, warn=warn, info=info)
    finally:
        if progress:
            progress.close()
    if not quiet:
        first, last = result.losses[0], result.losses[-1]
        click.echo(f"wrote {result.output}: LoRA adapter for {result.arch}, {result.trainable:,} trained parameters, "
                   f"{result.steps} steps (to step {result.total_steps}), loss {first:.3f} -> {last:.3f}, "
                   f"{result.tokens:,} tokens in {result.seconds:.1f} s of training ({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)")


class TrainProgress:
    """One self-rewriting status line on stderr: step, loss, learning rate, tokens/s."""

    def __init__(self) -> None:
        self._width = 0

    def update(self, log: StepLog) -> None:
        bar_len = 24
        filled = bar_len * log.step // max(log.total, 1)
        line = (f"[{'#' * filled}{'-' * (bar_len - filled)}] step {log.step}/{log.total}  loss {log.loss:.4f}  "
                f"lr {log.lr:.2e}  {log.tokens_per_s:,.0f} tok/s")
        click.echo("\r" + line.ljust(self._width), err=True, nl=False)
        self._width = len(line)

    def close(self) -> None:
        if self._width:
            click.echo("", err=True)


def release_command(src: Path, dist: Path, quants: str, *, name: str | None, adapter: Path | None,
                    dequantized_base: bool, imatrix: str | None, calibration: Path | None, calibration_ctx: int,
                    calibration_chunks: int | None, allow_non_finite: bool, split_max_size: str | None,
                    split_max_tensors: int | None, verify: bool, text_file: Path | None, max_kld: float | None,
                    threads: int | None, device: str, force: bool, quiet: bool, as_json: bool,
                    push_to: str | None = None, private: bool = False, revision: str | None = None,
                    mmproj_type: str = "f16") -> None:
    from mt.io.gguf_split import split_limit
    from mt.release.push import check_token, push
    from mt.release.release import file_entry, parse_quants, projector_entry, release
    from mt.imatrix.compute import ImatrixOptions
    from mt.verify.verify import VerifyOptions

    if push_to is not None:
        check_token()

    source = hub_source(src)
    name = name or (source.name if source else None)
    src, adapter = resolve_folder(src), adapter and resolve_folder(adapter)
    if threads:
        set_threads(threads)
    types = parse_quants(quants)
    limit = split_limit(split_max_size, split_max_tensors)
    options = VerifyOptions(text=_read_text(text_file) if text_file else None, max_kld=max_kld,
                            imatrix=Path(imatrix) if imatrix and imatrix != "auto" else None) if verify else None
    calibration_options = ImatrixOptions(ctx=calibration_ctx, chunks=calibration_chunks, device=device)
    result, elapsed = with_progress(not quiet and not as_json, lambda progress: release(
        src, dist, types, name=name, adapter=adapter, dequantized_base=dequantized_base, imatrix=imatrix,
        calibration=calibration, calibration_options=calibration_options, verify=options,
        device=device, split=limit, allow_non_finite=allow_non_finite, force=force, progress=progress,
        mmproj_type=mmproj_type))
    files = [file_entry(f) for f in result.files]
    mmproj = result.mmproj and projector_entry(result.mmproj)
    summary = {"dist": str(result.dist), "arch": result.arch, "files": files, "mmproj": mmproj,
               "bytes": sum(f["bytes"] for f in files) + (mmproj["bytes"] if mmproj else 0),
               "seconds": round(elapsed, 3), "notes": list(result.notes)}
    if push_to is not None:
        summary["pushed"] = push(result.dist, push_to, private, revision, quiet or as_json)
    if not quiet and not as_json:
        for note in result.notes:
            click.echo(f"mt: note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        for f in files:
            quality = f["verify"] and f["verify"].get("quality")
            numbers = f", KLD mean {quality['kld_mean']:.3g}, top-1 {quality['top1_agreement']:.1%}" if quality else ""
            verdict = "verified" if f["verify"] else "not verified"
            parts = f" in {len(f['parts'])} parts" if len(f["parts"]) > 1 else ""
            click.echo(f"  {f['file']}: {format_bytes(f['bytes'])}{parts}, {verdict}{numbers}")
        if mmproj:
            click.echo(f"  {mmproj['file']}: {format_bytes(mmproj['bytes'])}, the vision projector for every file")
        click.echo(f"wrote {summary['dist']}: {len(files) + bool(mmproj)} files, {format_bytes(summary['bytes'])} in {elapsed:.1f} s")
        if push_to is not None:
            click.echo(f"pushed to {push_to}: {summary['pushed']}")


def imatrix_command(src: Path, text_file: Path, out: Path, options: ImatrixOptions, *, fmt: str | None, force: bool,
                    quiet: bool, as_json: bool) -> None:
    from mt.imatrix.compute import imatrix_command_run

    src = resolve_folder(src)
    if options.adapter is not None:
        options = replace(options, adapter=resolve_folder(options.adapter))
    run, elapsed = with_progress(not quiet and not as_json, lambda progress: imatrix_command_run(
        src, text_file, out, options, fmt=fmt, force=force, progress=progress), label="chunks")
    summary = {"output": str(out), "matrices": len(run.imatrix.sums), "chunks": run.chunks,
               "chunk_size": run.imatrix.chunk_size, "text_tokens": run.text_tokens, "device": run.device,
               "dtype": run.dtype, "seconds": round(elapsed, 3)}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(f"wrote {out}: {summary['matrices']} matrices from {run.chunks} chunks of {run.imatrix.chunk_size} "
                   f"tokens (the text holds {run.text_tokens}), {run.device} {run.dtype}, in {elapsed:.1f} s")


def split_command(src: Path, out: Path, *, merge: bool, split_max_size: str | None, split_max_tensors: int | None,
                  force: bool) -> None:
    from mt.io.gguf_split import merge_gguf, split_gguf, split_limit

    if merge:
        if split_max_size is not None or split_max_tensors is not None:
            raise MtError("--merge takes no split size", "drop --split-max-size/--split-max-tensors")
        merge_gguf(src, out, force=force)
        click.echo(f"wrote {out}: {format_bytes(out.stat().st_size)}")
        return
    limit = split_limit(split_max_size, split_max_tensors if split_max_tensors is not None or split_max_size else 128)
    paths = split_gguf(src, out, limit, force=force)
    for path in paths:
        click.echo(f"  {path.name}: {format_bytes(path.stat().st_size)}")
    click.echo(f"wrote {len(paths)} parts; give llama.cpp the first: {paths[0]}")


def speak_command(tada: Path, text: str, out: Path, *, acoustic: Path | None, codec: Path | None, voice: Path | None,
                  options: SpeakOptions, seed: int | None, force: bool, quiet: bool, as_json: bool) -> None:
    from mt.speak.speak import speak, uncovered_script

    script = uncovered_script(text)
    if script is not None:
        click.echo(f"mt: warning: the text is written in {script} script, which none of tada-3b-ml's languages (en, ja, "
                   "de, fr, es, zh, ar, it, pl, pt) uses; expect poor speech", err=True)
    result = speak(tada, text, out, acoustic=acoustic, codec=codec, voice=voice, options=options, seed=seed, force=force)
    summary = {"output": str(out), "seconds": round(result.seconds, 3), "sample_rate": result.sample_rate,
               "tokens": result.tokens, "elapsed": round(result.elapsed, 3),
               "real_time_factor": round(result.real_time_factor, 3)}
    if as_json:
        click.echo(json.dumps(summary))
    elif not quiet:
        click.echo(f"wrote {out}: {result.seconds:.2f} s of speech at {result.sample_rate} Hz from {result.tokens} tokens "
                   f"in {result.elapsed:.1f} s (real-time factor {result.real_time_factor:.2f})")


def modelfile_command(gguf: Path, out: Path | None, *, force: bool) -> None:
    from mt.io.atomic import atomic_path, check_output
    from mt.release.modelfile import make_modelfile

    if not gguf.is_file():
        raise MtError(f"{gguf} does not exist", "pass a GGUF file")
    if out is not None:
        check_output(out, force)
    made = make_modelfile(gguf, None if out is None else _from_path(gguf, out))
    for note in made.notes:
        click.echo(f"mt: note: {note}", err=True)
    if out is None:
        click.echo(made.text, nl=False)
        return
    with atomic_path(out) as tmp:
        tmp.write_text(made.text, encoding="utf-8")


def _from_path(gguf: Path, modelfile: Path) -> str:
    """FROM as Ollama resolves it: relative to the Modelfile's folder."""
    try:
        return "./" + str(gguf.resolve().relative_to(modelfile.resolve().parent))
    except ValueError:
        return str(gguf.resolve())
