"""`mt verify`: a verdict from exact checks, and the losses measured.

1. mt writes the 16-bit reference conversion of the source; llama.cpp runs it and transformers runs the source:
   a tight KLD proves the architecture mapping, metadata and runtime for this model ("conversion").
2. The checked file is that conversion: its metadata, vocabulary and chat template equal what mt writes for the
   source, every tensor's bytes equal mt's encoding of the source tensor at the type the file holds, and llama.cpp
   tokenizes every text on it as on the reference ("metadata", "vocabulary", "chat template", "tensors",
   "tokenization").
3. The checked file's divergence from the source (KLD, top-1, ΔPPL) is measured ("quality"), judged only against
   the bars a pipeline sets (--max-kld, --min-top1).

One `Verifier` does the source's share once for every file checked against it.
"""

from __future__ import annotations

import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from mt.convert.arch import load_architecture
from mt.io.checkpoint import Checkpoint
from mt.convert.arch.base import Companion
from mt.convert.convert import companion_contents, gguf_contents, load, write_conversion
from mt.convert.mmproj import MMPROJ_ARCH, MMPROJ_OUTTYPES, mmproj_contents, mmproj_plan, vision_part
from mt.convert.plan import TensorPlan, build_plan, companion_plan
from mt.errors import CheckpointError, VerifyError
from mt.io.gguf_in import GGUFHeader, read_header
from mt.io.gguf_out import write_gguf
from mt.merge.source import on_disk
from mt.quant.imatrix import Imatrix, load_imatrix
from mt.quant.outtypes import by_file_type
from mt.quant.quantize import load_problem
from mt.verify.corpus import CORPUS
from mt.verify.exact import check_tensors
from mt.verify.layered import reference_logits, truncated_config
from mt.verify.logit_check import conversion_check, divergence, quality_check
from mt.verify.logits import llama_cpp_logits
from mt.verify.memory import phase
from mt.verify.metadata import check_metadata, check_vocabulary
from mt.verify.reference import GGUFModel, open_gguf, open_reference
from mt.verify.report import Check, Status, VerifyReport
from mt.verify.template import check_chat_template, check_llama_cpp_chat
from mt.verify.thresholds import QualityBars, conversion_limits, file_type_name
from mt.verify.tokens import check_tokenization, reference_tokenizer

FULL_DEPTH_BYTES = 1 << 30  # a 16-bit reference up to this size runs every layer; a larger one its first layers
MIN_SHALLOW_LAYERS = 2  # a layer's output feeding another layer is part of what the reference run proves


@dataclass(frozen=True)
class VerifyOptions:
    text: str | None = None  # the user's text: tokenized, and run through both models instead of the corpus
    max_tokens: int = 256
    n_ctx: int = 512
    max_kld: float | None = None
    min_top1: float | None = None
    adapter: Path | None = None  # a PEFT adapter folder the GGUF was merged from: merged into the source
    imatrix: Path | None = None  # the importance matrix the file was quantized with
    reference_layers: int | None = None  # layers the reference run covers; None: all up to FULL_DEPTH_BYTES
    allow_pickle: bool = False  # a reference of pytorch_model*.bin, loaded with torch.load(weights_only=True)


def _check_adapter(adapter: Path | None) -> None:
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise CheckpointError(f"no adapter_config.json in {adapter}", "pass the PEFT adapter folder the GGUF was merged from")


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def truncated_checkpoint(ckpt: Checkpoint, n_layers: int) -> Checkpoint:
    """The source cut to its first `n_layers` decoder layers (config and tensors)."""
    tensors = {k: v for k, v in ckpt.tensors.items() if (_layer_index(k) or 0) < n_layers}
    return replace(ckpt, config=truncated_config(ckpt.config, n_layers), tensors=tensors)


def layers_of_every_kind(folder: Path) -> int:
    """How many first layers hold one layer of each kind in transformers' `layer_types` (sliding, full …)."""
    from transformers import AutoConfig

    kinds = getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "layer_types", None) or []
    first: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        first.setdefault(kind, i)
    return max([MIN_SHALLOW_LAYERS, *(i + 1 for i in first.values())])


class Verifier:
    """The source's side of verification, computed once: reference files, token ids, logits."""

    def __init__(self, reference_dir: Path, options: VerifyOptions = VerifyOptions()) -> None:
        self.options = options
        _check_adapter(options.adapter)
        self._stack = ExitStack()
        try:
            self.ckpt, self.arch, self.plan = load(Path(reference_dir), "auto", allow_pickle=options.allow_pickle,
                                                   adapter=options.adapter)
            self.source_folder = on_disk(self.ckpt, self._stack)  # transformers reads folders
            # a model that is not a language model (TADA's codec decoder) has no tokenizer to read
            self.ref = open_reference(self.source_folder) if self.arch.decoder_config else None
            self.reference_dir = Path(reference_dir)
            self.workdir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-verify-")))
            self.imatrix: Imatrix | None = load_imatrix(options.imatrix) if options.imatrix else None
        except BaseException:
            self._stack.close()
            raise
        self._logits: dict[str, np.ndarray] = {}
        self.peak_rss: dict[str, float] = {}

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def n_layers(self) -> int:
        return self.arch.block_count()

    @cached_property
    def reference_layers(self) -> int:
        """Every layer of a small model; of a larger one, the first layers up to one of each kind it has (Gemma 3's
        sixth layer is its first global one): the tensor check covers the rest, which repeat those kinds."""
        wanted = self.options.reference_layers
        if wanted is None:
            wanted = self.n_layers if self.plan.nbytes <= FULL_DEPTH_BYTES else layers_of_every_kind(self.source_folder)
        return max(1, min(wanted, self.n_layers))

    @property
    def reference_type(self) -> str:
        return file_type_name(int(self.plan.file_type))

    @cached_property
    def header(self) -> GGUFHeader:
        """What mt writes for the whole source: metadata, vocabulary and tensor infos (no tensor data)."""
        path = self.workdir / "reference-header.gguf"
        contents, _ = gguf_contents(self.ckpt, self.arch, self.plan, vocab_only=False)
        write_gguf(path, contents)
        return read_header(path, header_only=True)

    @cached_property
    def f32_plan(self) -> TensorPlan:
        return build_plan(self.ckpt, self.arch, "f32")

    @cached_property
    def runtime_file(self) -> Path:
        """The 16-bit reference conversion llama.cpp runs (the first `reference_layers` layers)."""
        path = self.workdir / f"reference-{self.reference_type}.gguf"
        ckpt, arch, plan = self.ckpt, self.arch, self.plan
        if self.reference_layers < self.n_layers:
            ckpt = truncated_checkpoint(self.ckpt, self.reference_layers)
            arch = load_architecture(ckpt.architecture, ckpt.config)
            plan = build_plan(ckpt, arch, "auto")
        write_conversion(ckpt, arch, plan, path)
        return path

    @cached_property
    def ids(self) -> list[int]:
        """The source's tokens of the user's text (or the built-in corpus), at most min(max_tokens, ctx)."""
        text = self.options.text if self.options.text else "\n".join(CORPUS.values())
        return reference_tokenizer(self.ref)(text)[: min(self.options.max_tokens, self.options.n_ctx)]

    def _llama_cpp(self, path: Path) -> np.ndarray:
        with phase(self.peak_rss, "llama.cpp"):
            return llama_cpp_logits(path, self.ids, n_ctx=self.options.n_ctx)

    def source_logits(self, n_layers: int) -> np.ndarray:
        key = f"transformers:{n_layers}"
        if key not in self._logits:
            with phase(self.peak_rss, "transformers"):
                self._logits[key] = reference_logits(self.ckpt, self.ids, None if n_layers == self.n_layers else n_layers)
        return self._logits[key]

    def reference_conversion_logits(self) -> np.ndarray:
        if "reference" not in self._logits:
            self._logits["reference"] = self._llama_cpp(self.runtime_file)
        return self._logits["reference"]

    @cached_property
    def conversion(self) -> Check:
        """The reference conversion in llama.cpp against the source in transformers, as deep as the reference goes.
        Its logits (and a shallow source run's) are let go once compared."""
        candidate = self.reference_conversion_logits()
        shallow = self.reference_layers < self.n_layers
        stats, kld = divergence(self.source_logits(self.reference_layers), candidate, self.ids)
        if shallow:
            del self._logits["reference"], self._logits[f"transformers:{self.reference_layers}"]
        return conversion_check(stats, kld, conversion_limits(self.reference_type), self.reference_type,
                                self.reference_layers, self.n_layers)

    def describe(self) -> dict:
        return {"file_type": self.reference_type, "layers": self.reference_layers, "of_layers": self.n_layers,
                **conversion_limits(self.reference_type).to_dict()}

    @property
    def bars(self) -> QualityBars:
        return QualityBars(self.options.max_kld, self.options.min_top1)

    def verify(self, gguf_path: Path) -> VerifyReport:
        return self.check(open_gguf(gguf_path))

    def check(self, gguf: GGUFModel) -> VerifyReport:
        """Every check of one file; llama.cpp runs before transformers (one model in memory at a time)."""
        if gguf.arch == MMPROJ_ARCH and vision_part(self.ckpt) is not None:
            return self._mmproj_report(gguf)
        self._check_architecture(gguf.arch)
        header = gguf.header
        file_type = file_type_name(header.value("general.file_type"))
        if not self.arch.decoder_config:  # not a language model (TADA's codec decoder): its header and tensors
            checks = [check_metadata(header, self.header),
                      check_tensors(header, self.f32_plan.entries, self.ckpt.config, None)]
            return VerifyReport(str(gguf.path), str(self.reference_dir), self.arch.gguf_arch, file_type,
                                self.describe(), self.bars.to_dict(), checks, dict(self.peak_rss))
        unloadable = load_problem(header)  # llama.cpp would refuse the file, or abort the process on it
        with phase(self.peak_rss, "checks"):
            checks = [check_metadata(header, self.header), check_vocabulary(header, self.header),
                      check_chat_template(header, self.header, self.ref),
                      check_tensors(header, self.f32_plan.entries, self.ckpt.config, self.imatrix),
                      check_tokenization(gguf.path, self.runtime_file, self.ref, self.options.text) if unloadable is None
                      else Check("tokenization", Status.FAIL, f"llama.cpp cannot load the GGUF ({unloadable})")]
        same_as_reference = (checks[3].status is Status.PASS and self.reference_layers == self.n_layers
                             and file_type == self.reference_type)
        if "conversion" not in self.__dict__:
            self.reference_conversion_logits()  # llama.cpp runs before transformers loads anything
        candidate = f"llama.cpp cannot run the GGUF ({unloadable})" if unloadable is not None else \
            self._logits["reference"] if same_as_reference else self._file_logits(gguf.path, len(gguf.tokens))
        checks.append(self.conversion)
        checks.append(self._quality(candidate))
        checks.append(check_llama_cpp_chat(header, self.ref))
        checks += [self._companion_check(c, gguf.path) for c in self.arch.companions]
        return VerifyReport(str(gguf.path), str(self.reference_dir), self.arch.gguf_arch, file_type, self.describe(),
                            self.bars.to_dict(), checks, dict(self.peak_rss))

    def _file_logits(self, path: Path, n_vocab: int) -> np.ndarray | str:
        if any(i >= n_vocab for i in self.ids):
            return f"the text has token ids the file's {n_vocab}-token vocabulary lacks"
        try:
            return self._llama_cpp(path)
        except (ValueError, RuntimeError) as e:  # llama-cpp-python's "Failed to load model from file"
            return f"llama.cpp cannot run the GGUF ({e})"

    def _companion_check(self, companion: Companion, path: Path) -> Check:
        """The file written beside the checked one (TADA's acoustic file): its metadata and every tensor against what
        mt writes for the source."""
        name, beside = f"{companion.suffix.lstrip('-')} file", companion.path_beside(path)
        if not beside.is_file():
            return Check(name, Status.FAIL, f"{beside.name} is missing beside {path.name}",
                         [f"mt convert writes {beside.name} with {path.name}; the model does not run without it"])
        header = read_header(beside)
        plan = companion_plan(self.ckpt, self.arch, companion, "f32")
        expected_path = self.workdir / f"reference{companion.suffix}.gguf"
        write_gguf(expected_path, companion_contents(self.ckpt, companion, plan))
        parts = [check_metadata(header, read_header(expected_path, header_only=True)),
                 check_tensors(header, plan.entries, self.ckpt.config, None)]
        problems = [p for part in parts for p in part.problems if part.status is Status.FAIL]
        if problems:
            return Check(name, Status.FAIL, f"{beside.name}: {problems[0]}", problems)
        return Check(name, Status.PASS, f"{beside.name}: {parts[0].summary}; {parts[1].summary}")

    def _mmproj_report(self, gguf: GGUFModel) -> VerifyReport:
        """A vision-language source's mmproj file: its header and every tensor against mt's mmproj of the source at
        the file's type (the projector's arithmetic in llama.cpp is proven by mt's tests, not per file)."""
        part = vision_part(self.ckpt)
        assert part is not None
        header = gguf.header
        out = by_file_type(header.value("general.file_type"))
        if out is None or out.name not in MMPROJ_OUTTYPES:
            raise VerifyError(f"{gguf.path.name} is an mmproj file of type {header.value('general.file_type')!r}, "
                              "not one the converter writes", f"mt convert writes mmproj files as {', '.join(MMPROJ_OUTTYPES)}")
        plan = mmproj_plan(part, out)
        expected = self.workdir / "reference-mmproj.gguf"
        write_gguf(expected, mmproj_contents(part, plan))
        checks = [check_metadata(header, read_header(expected, header_only=True), text_model=False),
                  check_tensors(header, plan.entries, part.config, None)]
        file_type = file_type_name(int(out.file_type))
        return VerifyReport(str(gguf.path), str(self.reference_dir), MMPROJ_ARCH, file_type, {"file_type": file_type},
                            self.bars.to_dict(), checks, dict(self.peak_rss))

    def _quality(self, candidate: np.ndarray | str) -> Check:
        if isinstance(candidate, str):
            return Check("quality", Status.FAIL, candidate, [candidate])
        stats, kld = divergence(self.source_logits(self.n_layers), candidate, self.ids)
        return quality_check(stats, kld, self.bars)

    def _check_architecture(self, gguf_arch: str) -> None:
        """(An architecture mt does not know was refused when the source was loaded.)"""
        if gguf_arch != self.arch.gguf_arch:
            raise VerifyError(f"the GGUF is a {gguf_arch or 'unnamed'!r} model but {self.reference_dir} is "
                              f"{self.ckpt.architecture} ({self.arch.gguf_arch!r} in GGUF)",
                              "pass the folder this GGUF was made from")


def verify(gguf_path: Path, reference_dir: Path, options: VerifyOptions = VerifyOptions()) -> VerifyReport:
    """Inputs are checked before any model is loaded."""
    gguf = open_gguf(gguf_path)
    if not Path(reference_dir).is_dir():
        raise CheckpointError(f"reference {reference_dir} is not a folder", "pass the Hugging Face folder the GGUF was made from")
    with Verifier(reference_dir, options) as verifier:
        return verifier.check(gguf)
