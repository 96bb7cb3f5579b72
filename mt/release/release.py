"""`mt release`: every requested type from one read of the source, written side by side into a folder that appears
only when every file is complete.

Each source tensor is read (and, with an adapter, merged) once; each file's bytes of it are encoded from that read
and written at the tensor's place in the file (`io.gguf_out.PlacedTensors`), since a llama.cpp mix (Q4_K_M …) lays
its tensors out in llama-quantize's order and the converter's types in the checkpoint's. Every file is the file
`mt convert --outtype TYPE` writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from mt.convert.arch.base import Architecture
from mt.convert.convert import VocabKeys, gguf_contents, open_model
from mt.convert.mmproj import DEFAULT_MMPROJ_OUTTYPE, MMPROJ_OUTTYPES, MmprojOutput, mmproj_output
from mt.convert.plan import PlanEntry, TensorPlan, build_plan, produce_types
from mt.errors import MtError
from mt.io.atomic import atomic_dir, check_output
from mt.io.checkpoint import Checkpoint, folder_name
from mt.io.gguf_in import GGUFHeader, TensorInfo
from mt.io.gguf_out import GGUFContents
from mt.io.gguf_split import SplitLimit, SplitPlacedTensors, WrittenPart
from mt.io.stream import Chunk, Prefetcher, Progress
from mt.imatrix.compute import ImatrixOptions, compute_imatrix, read_calibration
from mt.release.card import CardRow, ImatrixNote, base_model, model_card, read_source_card
from mt.release.manifest import manifest
from mt.release.modelfile import make_modelfile
from mt.release.memory import MemoryEstimate, estimates
from mt.quant.device import GPU_TYPES, GpuQuantizer, select_device
from mt.quant.imatrix import GivenImatrix, load_imatrix, open_imatrix, write_imatrix_gguf
from mt.quant.outtypes import CONVERTER_TYPES, OUT_TYPES
from mt.verify.report import VerifyReport
from mt.verify.verify import Verifier, VerifyOptions

QUANT_CHOICES = list(OUT_TYPES)


@dataclass(frozen=True)
class ReleaseFile:
    outtype: str
    path: Path  # the file, or a split file's first part (what llama.cpp is given)
    plan: TensorPlan
    parts: tuple[WrittenPart, ...] = ()  # once written: the file, or each part of a split file
    memory: tuple[MemoryEstimate, ...] = ()  # what llama.cpp needs to run it (mt.release.memory)
    context_length: int | None = None  # from its metadata
    report: VerifyReport | None = None
    modelfile: str | None = None  # its Ollama Modelfile's name in DIST

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True)
class ProjectorFile:
    """A vision-language model's mmproj file, one for every text file of the release."""

    outtype: str
    path: Path
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class ReleaseResult:
    dist: Path
    arch: str
    files: list[ReleaseFile]
    nbytes_written: int
    notes: tuple[str, ...] = ()  # what the Modelfiles could not say (mt.release.modelfile)
    mmproj: ProjectorFile | None = None


class ReleaseVerifyFailed(MtError):
    """A file of the release failed mt verify: nothing is released."""


def parse_quants(spec: str) -> list[str]:
    """`--quants f16,q8_0,q4_k_m`: known types, each once, in the order given."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if not names:
        raise MtError("--quants names no type", f"list some of {', '.join(QUANT_CHOICES)}, e.g. --quants q8_0,q4_k_m")
    if unknown := [n for n in names if n not in QUANT_CHOICES]:
        raise MtError(f"--quants: unknown type {unknown[0]!r}", f"choose from {', '.join(QUANT_CHOICES)}")
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise MtError(f"--quants names {repeated[0]} twice", "list each type once")
    return names


def file_name(name: str, outtype: str) -> str:
    """As GGUF repositories on the Hub name their files: NAME-Q4_K_M.gguf."""
    return f"{name}-{outtype.upper()}.gguf"


def mmproj_name(name: str, outtype: str) -> str:
    """mmproj-NAME-F16.gguf, as the Hub's GGUF repositories name a vision model's projector."""
    return f"mmproj-{file_name(name, outtype)}"


def release(src: Path, dist: Path, quants: list[str], *, name: str | None = None, adapter: Path | None = None,
            dequantized_base: bool = False, imatrix: str | Path | None = None, calibration: Path | None = None,
            calibration_options: ImatrixOptions = ImatrixOptions(), verify: VerifyOptions | None = VerifyOptions(),
            device: str = "auto", split: SplitLimit = SplitLimit(), allow_non_finite: bool = False, force: bool = False,
            progress: Progress | None = None, mmproj_type: str = DEFAULT_MMPROJ_OUTTYPE) -> ReleaseResult:
    """`verify`: the options every file is verified with (None: not verified); a failure releases nothing.
    `device`: where the types a GPU computes are quantized (auto | cpu | cuda), as for mt convert.
    `imatrix`: llama.cpp's mixes (q4_k_m …) quantized with it, as llama-quantize --imatrix (with `verify`, pass it in
    its options too); the converter's types (f16, q8_0 …) take none. "auto": computed first by mt imatrix over the
    text in `calibration` (with `calibration_options`), used for every mix and verify, shipped as imatrix.gguf.
    `split`: a file over the limit is written in parts NAME-TYPE-00001-of-0000N.gguf, as gguf-split writes them.
    `mmproj_type`: the type of a vision-language model's mmproj file (f16, bf16, f32, q8_0), shipped once beside the
    text files."""
    if (imatrix == "auto") != (calibration is not None):
        raise MtError("--imatrix auto and --calibration go together",
                      "pass --imatrix auto --calibration TEXT to compute the matrix, or --imatrix FILE to use one")
    ckpt, arch = open_model(Path(src), adapter, dequantized_base, allow_non_finite=allow_non_finite)
    if arch.companions:
        raise MtError(f"{ckpt.architecture} converts to several files (a model and its companions)",
                      "convert it with mt convert, one type at a time")
    if mmproj_type not in MMPROJ_OUTTYPES:
        raise MtError(f"--mmproj-type {mmproj_type} is not a type the converter writes mmproj files in",
                      f"choose one of {', '.join(MMPROJ_OUTTYPES)}")
    check_output(dist, force, folder=True)
    with ExitStack() as scratch:
        shipped, given = None, open_imatrix(imatrix) if imatrix not in (None, "auto") else None
        if calibration is not None:
            shipped = _computed_imatrix(Path(src), calibration, replace(calibration_options, adapter=adapter), scratch)
            given = GivenImatrix(load_imatrix(shipped), SHIPPED_IMATRIX)  # the files record the name it ships under
            verify = verify and replace(verify, imatrix=shipped)
        return _release(Path(src), ckpt, arch, dist, quants, name, adapter, given, shipped, verify, device, split,
                        allow_non_finite, progress, mmproj_type)


SHIPPED_IMATRIX = "imatrix.gguf"  # a computed matrix's name in DIST (and in the files' quantize.imatrix.file)


def _computed_imatrix(src: Path, calibration: Path, options: ImatrixOptions, scratch: ExitStack) -> Path:
    path = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="mt-imatrix-"))) / SHIPPED_IMATRIX
    run = compute_imatrix(src, read_calibration(calibration), str(calibration), options)
    write_imatrix_gguf(path, run.imatrix)
    return path


def _release(src: Path, ckpt: Checkpoint, arch: Architecture, dist: Path, quants: list[str], name: str | None,
             adapter: Path | None, given: GivenImatrix | None, shipped: Path | None, verify: VerifyOptions | None,
             device: str, split: SplitLimit, allow_non_finite: bool, progress: Progress | None,
             mmproj_type: str = DEFAULT_MMPROJ_OUTTYPE) -> ReleaseResult:
    plans = {q: build_plan(ckpt, arch, q, given) for q in quants}
    uses_gpu_types = any(e.qtype in GPU_TYPES for plan in plans.values() for e in plan.entries)
    gpu = select_device(device) if device == "cuda" or uses_gpu_types else None
    name = name or folder_name(src)
    with atomic_dir(dist) as stage:
        files = [ReleaseFile(q, stage / file_name(name, q), plans[q]) for q in quants]
        mmproj = mmproj_output(ckpt, stage / mmproj_name(name, mmproj_type), CONVERTER_TYPES[mmproj_type])
        files, written = _write_all(ckpt, arch, files, gpu, split, progress, not allow_non_finite)
        projector = _write_mmproj(mmproj, mmproj_type, not allow_non_finite)
        if verify is not None:
            files = [replace(f, report=r) for f, r in zip(files, _verified(src, files, replace(verify, adapter=adapter)))]
        files, notes = _modelfiles(stage, files)
        rows = _card_rows(files)
        source_name = folder_name(src)
        note = _imatrix_note(given, shipped, stage)
        (stage / "README.md").write_text(model_card(name, read_source_card(ckpt.folder), ckpt.config, source_name, rows,
                                                    note, projector and projector.path.name), encoding="utf-8")
        listing = manifest(name, base_model(ckpt.config, source_name), arch.gguf_arch, n_parameters(files[0].plan),
                           files[0].context_length, [file_entry(f) for f in files],
                           projector and projector_entry(projector))
        (stage / "manifest.json").write_text(json.dumps(listing, indent=2) + "\n", encoding="utf-8")
    final = [replace(f, path=dist / f.path.name, parts=tuple(replace(p, path=dist / p.path.name) for p in f.parts),
                     report=f.report and replace(f.report, gguf=str(dist / f.path.name))) for f in files]
    projector = projector and replace(projector, path=dist / projector.path.name)
    return ReleaseResult(dist, arch.gguf_arch, final, written, notes, projector)


def _write_mmproj(output: MmprojOutput | None, outtype: str, check_finite: bool) -> ProjectorFile | None:
    if output is None:
        return None
    output.write(output.path, None, output.plan.nbytes, check_finite)
    return ProjectorFile(outtype, output.path, output.path.stat().st_size, file_sha256(output.path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def projector_entry(projector: ProjectorFile) -> dict[str, Any]:
    return {"file": projector.path.name, "type": projector.outtype, "bytes": projector.nbytes,
            "sha256": projector.sha256}


def _imatrix_note(given: GivenImatrix | None, shipped: Path | None, stage: Path) -> ImatrixNote | None:
    """The matrix for the card; `shipped` (one mt computed) is copied beside the files."""
    if given is None:
        return None
    if shipped is not None:
        shutil.copyfile(shipped, stage / SHIPPED_IMATRIX)
    imatrix = given.imatrix
    dataset = imatrix.datasets[0].decode("utf-8", errors="replace") if imatrix.datasets else "an unnamed text"
    return ImatrixNote(dataset, imatrix.chunk_count, imatrix.chunk_size, SHIPPED_IMATRIX if shipped else None)


def _modelfiles(stage: Path, files: list[ReleaseFile]) -> tuple[list[ReleaseFile], tuple[str, ...]]:
    """An Ollama Modelfile beside each file, NAME-TYPE.Modelfile (FROM the file, or a split file's first part)."""
    notes: list[str] = []
    out = []
    for f in files:
        made = make_modelfile(f.path)
        name = f.path.name.removesuffix(".gguf").split("-00001-of-")[0] + ".Modelfile"
        (stage / name).write_text(made.text, encoding="utf-8")
        notes += made.notes
        if len(f.parts) > 1:
            notes.append(f"{name} names the first of {len(f.parts)} parts; Ollama takes a single file: merge them with "
                         "mt split --merge before ollama create")
        out.append(replace(f, modelfile=name))
    return out, tuple(dict.fromkeys(notes))


def _write_all(ckpt: Checkpoint, arch: Architecture, files: list[ReleaseFile], gpu: GpuQuantizer | None,
               split: SplitLimit, progress: Progress | None, check_finite: bool) -> tuple[list[ReleaseFile], int]:
    """Every file written from one read of the source; the files with their parts (sha256 each), and the tensor
    bytes written."""
    outputs: list[SplitPlacedTensors] = []
    vocab = VocabKeys()
    try:
        for i, f in enumerate(files):
            contents = gguf_contents(ckpt, arch, f.plan, vocab_only=False, vocab=vocab)[0]
            summary = _summary(f.path, contents)
            files[i] = replace(f, memory=tuple(estimates(summary)),
                               context_length=summary.value(f"{arch.gguf_arch}.context_length"))
            outputs.append(SplitPlacedTensors(f.path, contents, split, header_later=True))
        order = build_plan(ckpt, arch, "f32").entries  # the checkpoint's order: each tensor read once, in turn
        total = sum(f.plan.nbytes for f in files)
        written = 0
        # the headers are packed (Python) on a thread of their own while the quantizers (numba, no GIL) run
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mt-headers") as pool:
            headers = pool.submit(lambda: [out.write_headers() for out in outputs])
            producer = Prefetcher(_encoded(order, files, ckpt.config, gpu, check_finite), depth=2)
            try:
                for entry_name, chunks in producer:
                    for out, chunk in zip(outputs, chunks):
                        n = out.write(entry_name, chunk)
                        written += n
                        if progress is not None:
                            progress(n, total)
            finally:
                producer.close()
            headers.result()
        return [replace(f, path=out.paths[0], parts=tuple(out.finish())) for f, out in zip(files, outputs)], written
    finally:
        for out in outputs:
            out.close()


def _summary(path: Path, contents: GGUFContents) -> GGUFHeader:
    """The header of a file about to be written, as far as the memory estimate reads it (no vocabulary): the file is
    not read back for it."""
    kv = {key: (m.vtype, m.value) for key, m in contents.metadata.items() if not key.startswith("tokenizer.")}
    tensors = [TensorInfo(s.name, tuple(reversed(s.shape)), s.ggml_type, 0, path) for s in contents.slots]
    return GGUFHeader(path, 3, kv, tensors, {})


def _card_rows(files: list[ReleaseFile]) -> list[CardRow]:
    return [CardRow(f.path.name, f.outtype, f.nbytes, bits_per_weight(f.plan),
                    verify_numbers(f.report)["quality"] if f.report is not None else None, len(f.parts),
                    tuple((e.n_ctx, e.total) for e in f.memory if e.cache_type == "f16"))
            for f in files]


def file_entry(f: ReleaseFile) -> dict[str, Any]:
    """A file as the manifest and --json describe it. A split file is named by its first part; `sha256` is then null
    and each of its `parts` has its own."""
    whole = len(f.parts) == 1
    return {"file": f.path.name, "type": f.outtype, "file_type": f.plan.file_type.name,
            "bytes": f.nbytes, "sha256": f.parts[0].sha256 if whole else None,
            "parts": [{"file": p.path.name, "bytes": p.nbytes, "sha256": p.sha256} for p in f.parts],
            "bits_per_weight": round(bits_per_weight(f.plan), 4), "modelfile": f.modelfile,
            "verify": verify_numbers(f.report) if f.report is not None else None,
            "memory": [{"n_ctx": e.n_ctx, "kv_cache_type": e.cache_type, "weights_bytes": e.weights,
                        "kv_cache_bytes": e.kv_cache, "total_bytes": e.total} for e in f.memory]}


def n_parameters(plan: TensorPlan) -> int:
    return sum(math.prod(e.shape) for e in plan.entries)


def bits_per_weight(plan: TensorPlan) -> float:
    return plan.nbytes * 8 / n_parameters(plan)


def verify_numbers(report: VerifyReport) -> dict[str, Any]:
    """The verdict and the quality numbers of a file's verify report."""
    quality = next((c.data for c in report.checks if c.name == "quality"), {})
    keys = ("kld_mean", "kld_p99", "top1_agreement", "delta_ppl")
    return {"passed": report.passed, "quality": {k: quality[k] for k in keys if k in quality}}


def _verified(src: Path, files: list[ReleaseFile], options: VerifyOptions) -> list[VerifyReport]:
    """Every file verified against the source, the work that does not depend on the file done once."""
    with Verifier(src, options) as verifier:
        reports = []
        for f in files:
            report = verifier.verify(f.path)
            if not report.passed:
                failed = report.failed_checks()
                raise ReleaseVerifyFailed(
                    f"{f.path.name} failed mt verify: {failed[0].name}: {failed[0].summary}",
                    f"nothing was released; run mt verify on mt convert --outtype {f.outtype} for the whole report")
            reports.append(report)
        return reports


def _encoded(order: list[PlanEntry], files: list[ReleaseFile], config: dict, gpu: GpuQuantizer | None,
             check_finite: bool) -> Iterator[tuple[str, list[Chunk]]]:
    """(tensor name, a chunk per file) for every row slab of every tensor."""
    by_name = [{e.name: e for e in f.plan.entries} for f in files]
    for entry in order:
        planned = [entries[entry.name] for entries in by_name]
        for chunks in produce_types(entry, [e.qtype for e in planned], config, gpu, [e.weights for e in planned],
                                    check_finite):
            yield entry.name, chunks
