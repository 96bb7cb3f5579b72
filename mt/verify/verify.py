"""`mt verify`: every check on one GGUF against its source folder, in one report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mt.convert.arch import MODULES, load_architecture
from mt.errors import CheckpointError, MtError, UnsupportedArchitecture, VerifyError
from mt.verify.corpus import CORPUS
from mt.verify.logit_check import check_logits
from mt.verify.metadata import check_metadata, check_vocabulary
from mt.verify.reference import GGUFModel, Reference, open_gguf, open_reference
from mt.verify.report import Check, VerifyReport
from mt.verify.template import check_chat_template, check_llama_cpp_chat
from mt.verify.thresholds import file_type_name, thresholds_for
from mt.verify.tokens import check_tokenization, reference_tokenizer


@dataclass(frozen=True)
class VerifyOptions:
    text: str | None = None  # the user's text: tokenized, and run through both models instead of the corpus
    max_tokens: int = 256
    n_ctx: int = 512
    threshold_kld: float | None = None
    adapter: Path | None = None  # a PEFT adapter folder the GGUF was merged from: merged into the source's forward


def _check_architecture(gguf: GGUFModel, ref: Reference) -> str:
    hf_arch = ref.hf_architecture
    if hf_arch not in MODULES:
        raise UnsupportedArchitecture(f"the reference's architecture {hf_arch or '(none)'!r} is not supported",
                                      f"mt verifies {', '.join(sorted(MODULES))}")
    expected = load_architecture(hf_arch, ref.config).gguf_arch
    if gguf.arch != expected:
        raise VerifyError(f"{gguf.path} is a {gguf.arch or 'unnamed'!r} model but {ref.folder} is {hf_arch} "
                          f"({expected!r} in GGUF)", "pass the folder this GGUF was made from")
    return expected


def logit_ids(ref: Reference, options: VerifyOptions) -> list[int]:
    """The source's tokens of the user's text (or the built-in corpus), at most min(max_tokens, ctx)."""
    text = options.text if options.text else "\n".join(CORPUS.values())
    return reference_tokenizer(ref)(text)[: min(options.max_tokens, options.n_ctx)]


def _check_adapter(adapter: Path | None) -> None:
    if adapter is None:
        return
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise CheckpointError(f"no adapter_config.json in {adapter}", "pass the PEFT adapter folder the GGUF was merged from")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise MtError("--adapter needs the peft package", "pip install peft") from None


def verify(gguf_path: Path, reference_dir: Path, options: VerifyOptions = VerifyOptions()) -> VerifyReport:
    """Inputs are checked before any model is loaded; llama.cpp runs before transformers (one model in RAM)."""
    gguf = open_gguf(gguf_path)
    ref = open_reference(reference_dir)
    _check_adapter(options.adapter)
    arch = _check_architecture(gguf, ref)
    file_type = file_type_name(gguf.header.value("general.file_type"))
    limits = thresholds_for(file_type, options.threshold_kld)
    checks: list[Check] = [check_metadata(gguf, ref), check_vocabulary(gguf, ref),
                           check_tokenization(gguf.path, ref, options.text)]
    ids = logit_ids(ref, options)
    run = check_logits(gguf.path, ref.folder, ids, options.n_ctx, limits, len(gguf.tokens), options.adapter)
    checks += [run.check, check_chat_template(gguf, ref), check_llama_cpp_chat(gguf, ref)]
    return VerifyReport(str(gguf.path), str(ref.folder), arch, file_type, limits.to_dict(), checks, run.peak_rss_mib)

