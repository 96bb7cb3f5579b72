"""`mt convert`: HF checkpoint folder -> GGUF, one tensor at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import LlamaFileType

from mt.convert.arch import as_text_model, load_architecture
from mt.convert.arch.base import Architecture, Companion
from mt.convert.general import write_general_metadata
from mt.convert.mmproj import MmprojOutput, mmproj_output, mmproj_outtype, mmproj_path
from mt.io.checkpoint import Checkpoint
from mt.convert.plan import (TensorPlan, build_plan, companion_plans, is_mix, main_file_tensors, payloads,
                             start_producing, write_planned)
from mt.io.stream import Progress
from mt.convert.special import read_tokenizer_json
from mt.convert.validate import check_against_config
from mt.convert.vocab import VocabSummary, read_json
from mt.errors import MtError, TokenizerError
from mt.io.atomic import atomic_paths, check_output
from mt.io.gguf_out import GGUFContents, MetaValue, write_gguf
from mt.quant.device import GPU_TYPES, select_device
from mt.quant.imatrix import open_imatrix
from mt.quant.quantize import put_quantization_keys_last

@dataclass
class CompanionOutput:
    """A companion GGUF of this conversion: where it goes and what it holds."""

    companion: Companion
    path: Path
    plan: TensorPlan


@dataclass
class ConvertResult:
    output: Path
    plan: TensorPlan
    arch: str
    vocab: VocabSummary | None
    nbytes_written: int
    companions: list[CompanionOutput] = field(default_factory=list)
    mmproj: MmprojOutput | None = None


@dataclass
class VocabKeys:
    """The keys a source's tokenizer adds to a file, kept from the first file for the next ones (`mt release` writes
    one source's vocabulary into several files; a 128k-token vocabulary takes about a second to build)."""

    keys: dict[str, MetaValue] | None = None
    summary: VocabSummary | None = None


def _add_vocab(ckpt: Checkpoint, arch: Architecture, w: GGUFContents, kept: VocabKeys | None) -> VocabSummary | None:
    if kept is not None and kept.keys is not None:
        w.metadata.update(kept.keys)  # a key set before keeps its place, as it does when the tokenizer sets it
        return kept.summary
    before = dict(w.metadata)
    summary = arch.write_vocab(ckpt.side_files, w)
    read_tokenizer_json.cache_clear()
    if kept is not None:
        kept.keys = {key: value for key, value in w.metadata.items() if before.get(key) is not value}
        kept.summary = summary
    return summary


def gguf_contents(ckpt: Checkpoint, arch: Architecture, plan: TensorPlan, vocab_only: bool,
                  vocab: VocabKeys | None = None) -> tuple[GGUFContents, VocabSummary]:
    """Metadata in llama.cpp's converter order: general.*, hyperparameters, quantization version, vocab (taken from
    `vocab` when it holds the keys already, else built, and kept there)."""
    w = GGUFContents(arch.gguf_arch)
    if not vocab_only:
        for e in plan.entries:
            w.add_slot(e.name, e.shape, e.qtype, e.nbytes)
        arch.write_tensor_pass_keys(w)
    w.add_type(gguf.GGUFType.MODEL)
    write_general_metadata(w, ckpt.folder)
    arch.write_hparams(w, int(LlamaFileType.ALL_F32 if plan.llama_quantize_layout else plan.file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    summary = _add_vocab(ckpt, arch, w, vocab)
    if plan.llama_quantize_layout:
        put_quantization_keys_last(w, plan.file_type)
    for key, vtype, value in plan.imatrix_keys:
        w.remove(key)  # llama-quantize re-sets the key: it moves to the end
        w.add_key_value(key, value, vtype)
    return w, summary


def _plan_uses_gpu_types(plan: TensorPlan) -> bool:
    return any(e.qtype in GPU_TYPES for e in plan.entries)


def open_model(src: Path, adapter: Path | None = None, dequantized_base: bool = False,
               allow_pickle: bool = False, allow_non_finite: bool = False) -> tuple[Checkpoint, Architecture]:
    """The source (with `adapter` merged in on the fly) and its architecture, its tensors checked against its
    config before anything is written. `allow_non_finite`: a merge that makes NaN/Inf is not refused."""
    from mt.merge.source import open_source

    ckpt = as_text_model(open_source(src, adapter, dequantized_base=dequantized_base, allow_pickle=allow_pickle,
                                     allow_non_finite=allow_non_finite))
    arch = load_architecture(ckpt.architecture, ckpt.config)
    tokenizer_config = ckpt.side_files / "tokenizer_config.json"
    if tokenizer_config.is_file() and not isinstance(read_json(tokenizer_config), dict):
        raise TokenizerError(f"{tokenizer_config} is not a JSON object", "fix or replace the tokenizer file")
    if arch.decoder_config:
        for _ in main_file_tensors(arch, ckpt.tensors):  # a tensor the family does not know is named first
            pass
        check_against_config(ckpt.config, arch.source_tensors(ckpt.tensors))
    return ckpt, arch


def load(src: Path, outtype: str, allow_pickle: bool = False, adapter: Path | None = None,
         dequantized_base: bool = False, imatrix: str | Path | None = None,
         allow_non_finite: bool = False) -> tuple[Checkpoint, Architecture, TensorPlan]:
    """The source (with `adapter` merged in on the fly), its architecture and the tensor plan (with `imatrix`:
    a llama.cpp mix quantized as llama-quantize --imatrix does)."""
    given = open_imatrix(imatrix) if imatrix is not None else None
    ckpt, arch = open_model(src, adapter, dequantized_base, allow_pickle, allow_non_finite)
    if given is not None and not is_mix(arch.check_outtype(outtype)):
        raise MtError(f"--imatrix goes with llama.cpp's mixes (q4_k_m …); {outtype} is written by the converter, "
                      "which takes none", "drop --imatrix, or pick a mix such as q4_k_m")
    return ckpt, arch, build_plan(ckpt, arch, outtype, given)


def convert(
    src: Path,
    out: Path,
    outtype: str = "auto",
    *,
    force: bool = False,
    vocab_only: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    device: str = "auto",
    adapter: Path | None = None,
    dequantized_base: bool = False,
    imatrix: str | Path | None = None,
    allow_non_finite: bool = False,
) -> ConvertResult:
    """`allow_non_finite`: write NaN/Inf weights (and F16 overflows) as they come instead of refusing them."""
    ckpt, arch, plan = load(src, outtype, allow_pickle, adapter, dequantized_base, imatrix, allow_non_finite)
    companions = [] if vocab_only else companion_outputs(ckpt, arch, out, outtype)
    mmproj = None if vocab_only else mmproj_output(ckpt, mmproj_path(out), mmproj_outtype(outtype, ckpt))
    for path in [out, *(c.path for c in companions), *([mmproj.path] if mmproj else [])]:
        check_output(path, force)
    return _convert(ckpt, arch, plan, out, vocab_only, progress, device, companions, not allow_non_finite, mmproj)


def write_conversion(ckpt: Checkpoint, arch: Architecture, plan: TensorPlan, out: Path, device: str = "cpu") -> ConvertResult:
    """Write a source already loaded, with its plan (no companion files), to `out`."""
    return _convert(ckpt, arch, plan, out, False, None, device)


def companion_outputs(ckpt: Checkpoint, arch: Architecture, out: Path, outtype: str) -> list[CompanionOutput]:
    outputs = [CompanionOutput(c, c.path_beside(out), plan) for c, plan in companion_plans(ckpt, arch, outtype)]
    if any(c.path.resolve() == out.resolve() for c in outputs):
        raise MtError(f"{out} is also the name of its companion file", "give the output another name, e.g. model.gguf")
    return outputs


def _convert(ckpt: Checkpoint, arch: Architecture, plan: TensorPlan, out: Path, vocab_only: bool,
             progress: Progress | None, device: str, companions: list[CompanionOutput] | None = None,
             check_finite: bool = True, mmproj: MmprojOutput | None = None) -> ConvertResult:
    companions = companions or []
    extra_paths = [c.path for c in companions] + ([mmproj.path] if mmproj else [])
    gpu = select_device(device) if not vocab_only and (device == "cuda" or _plan_uses_gpu_types(plan)) else None
    producer = None if vocab_only else start_producing(plan, ckpt.config, gpu=gpu, check_finite=check_finite)
    total = plan.nbytes + sum(c.plan.nbytes for c in companions) + (mmproj.plan.nbytes if mmproj else 0)
    written = 0
    try:
        contents, vocab = gguf_contents(ckpt, arch, plan, vocab_only)
        with atomic_paths([out, *extra_paths]) as (tmp, *extra_tmps):
            tensors = None if producer is None else payloads(plan, producer, progress, total)
            written = write_gguf(tmp, contents, tensors)
            for c, companion_tmp in zip(companions, extra_tmps):
                written += write_companion(ckpt, c, companion_tmp, progress, total, check_finite)
            if mmproj is not None:
                written += mmproj.write(extra_tmps[-1], progress, total, check_finite)
    finally:
        if producer is not None:
            producer.close()
    return ConvertResult(out, plan, arch.gguf_arch, vocab, written, companions, mmproj)


def companion_contents(ckpt: Checkpoint, companion: Companion, plan: TensorPlan) -> GGUFContents:
    """The companion GGUF's header: general metadata, the family's own keys under its arch name, its tensor infos."""
    w = GGUFContents(companion.gguf_arch)
    for e in plan.entries:
        w.add_slot(e.name, e.shape, e.qtype, e.nbytes)
    w.add_type(gguf.GGUFType.MODEL)
    write_general_metadata(w, ckpt.folder)
    w.add_file_type(int(plan.file_type))
    companion.write_metadata(w, ckpt.config, ckpt.side_files)
    return w


def write_companion(ckpt: Checkpoint, output: CompanionOutput, path: Path, progress: Progress | None, total: int,
                    check_finite: bool = True) -> int:
    contents = companion_contents(ckpt, output.companion, output.plan)
    return write_planned(path, contents, output.plan, ckpt.config, progress, total, check_finite)
