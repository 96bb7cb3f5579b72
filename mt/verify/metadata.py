"""Metadata, vocabulary and file type: the checked file's keys against mt's conversion of the source, key by key.

The reference is what mt writes for the source (byte-identical to llama.cpp's converter), so llama.cpp's own
conventions (spaces in user-defined SentencePiece tokens, its token types) are what is expected, not mismatches.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mt.io.gguf_in import GGUFHeader
from mt.quant.choose import Writer, tensor_types
from mt.quant.mix import MixOptions, TensorSpec, allows_quantization, header_facts, llama_order
from mt.quant.outtypes import OutType, by_file_type
from mt.verify.report import Check, Status
from mt.verify.template import TEMPLATE_KEY as TEMPLATE
from mt.verify.thresholds import file_type_name

SET_BY_QUANTIZER = ("general.file_type",)  # compared with the tensor types instead
NOT_COMPARED = ("quantize.imatrix.", "split.", "GGUF.")  # what the imatrix run and gguf-split record
INFORMATIONAL = "general."  # names, licence, tags …: reported, never failing (llama.cpp reads none of it to compute)
VOCABULARY = "tokenizer.ggml."
TOKEN_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}
SHOWN = 20


def _show(value: Any, width: int = 60) -> str:
    text = repr(value) if not isinstance(value, list) else f"[{len(value)} items]"
    return text if len(text) <= width else text[:width] + "…"


def _differences(checked: GGUFHeader, reference: GGUFHeader, keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        mine, theirs = checked.value(key), reference.value(key)
        if key not in checked.kv:
            out.append(f"{key} is missing (mt's conversion of the source: {_show(theirs)})")
        elif key not in reference.kv:
            out.append(f"{key} = {_show(mine)} is not in mt's conversion of the source")
        elif mine != theirs:
            out.append(f"{key} = {_show(mine)}, mt's conversion of the source has {_show(theirs)}")
    return out


def _keys(checked: GGUFHeader, reference: GGUFHeader, wanted) -> list[str]:
    keys = list(reference.kv) + [k for k in checked.kv if k not in reference.kv]
    return [k for k in keys if wanted(k) and not k.startswith(NOT_COMPARED) and k not in SET_BY_QUANTIZER]


def _is_model_key(key: str) -> bool:
    return not key.startswith((INFORMATIONAL, VOCABULARY, TEMPLATE))


def check_metadata(checked: GGUFHeader, reference: GGUFHeader, text_model: bool = True) -> Check:
    """Hyperparameters (every key outside general.* and tokenizer.*) exactly; general.* differences are warnings;
    general.file_type must describe the tensors by llama.cpp's rules for text models (`text_model`; an mmproj file's
    types follow the converter's rules for its projector, which the tensor check compares)."""
    problems = _differences(checked, reference, _keys(checked, reference, _is_model_key))
    informational = _differences(checked, reference, _keys(checked, reference, lambda k: k.startswith(INFORMATIONAL)))
    file_type_problem, file_type_note = file_type_findings(checked) if text_model else ([], [])
    problems += file_type_problem
    compared = len(_keys(checked, reference, lambda k: not k.startswith((VOCABULARY, TEMPLATE))))
    if problems:
        return Check("metadata", Status.FAIL, "; ".join(problems[:3]), problems + informational)
    notes = informational + file_type_note
    summary = f"{compared} keys equal mt's conversion of the source; general.file_type {file_type_name(checked.value('general.file_type'))} fits the tensors"
    if notes:
        return Check("metadata", Status.WARN, f"{summary}; {len(notes)} note(s): {notes[0]}", notes)
    return Check("metadata", Status.PASS, summary)


def _expected_types(checked: GGUFHeader, out: OutType, pure: bool) -> dict[str, T]:
    """What llama.cpp would give each tensor for `out`: the converter's rule for the types only it writes,
    llama-quantize's otherwise."""
    infos = {t.name: t for t in checked.tensors}
    if not out.quantizer:
        return tensor_types(out, Writer.CONVERTER, [TensorSpec(t.name, t.shape, T.F32) for t in infos.values()])
    facts = header_facts(checked.value)
    options = MixOptions(pure=pure, has_imatrix=any(k.startswith("quantize.imatrix.") for k in checked.kv))
    specs = [TensorSpec(n, infos[n].shape, T.F32) for n in llama_order(list(infos))]
    return tensor_types(out, Writer.QUANTIZER, specs, facts, options)


def file_type_findings(checked: GGUFHeader) -> tuple[list[str], list[str]]:
    """(problems, notes): a general.file_type most tensors contradict is a problem; a few tensors off the default
    choice (llama-quantize's --output-tensor-type, --token-embedding-type, --tensor-type) are notes."""
    raw = checked.value("general.file_type")
    name = file_type_name(raw)
    try:
        LlamaFileType(raw)
    except (TypeError, ValueError):
        return [f"general.file_type is {name}"], []
    out = by_file_type(raw)
    if out is None:
        return [], [f"mt cannot tell which tensor types general.file_type {name} implies"]
    actual = {t.name: t.type for t in checked.tensors}
    # MXFP4 experts come as they are from an MXFP4 checkpoint (gpt-oss) whatever the out type, and the converter
    # labels such a float file MXFP4_MOE
    quantizable = [t.name for t in checked.tensors if t.type != T.MXFP4
                   and allows_quantization(TensorSpec(t.name, t.shape, t.type), MixOptions())]
    if raw == LlamaFileType.MOSTLY_MXFP4_MOE and len({actual[n] for n in quantizable} - {T.Q8_0}) <= 1:
        return [], []
    choices = [_expected_types(checked, out, pure) for pure in (False, True)]
    off = [n for n in quantizable if all(actual[n] != c[n] for c in choices)]
    if not off:
        return [], []
    example = f"{off[0]} is {actual[off[0]].name}, {name} gives it {choices[0][off[0]].name}"
    counts = Counter(actual[n].name for n in quantizable)
    if len(off) * 2 > len(quantizable):
        return [f"general.file_type says {name} but {len(off)} of {len(quantizable)} weight tensors do not have the type "
                f"{name} gives them (e.g. {example}; the file holds {dict(counts)})"], []
    if all(n in ("output.weight", "token_embd.weight") for n in off):
        return [], []
    return [], [f"{len(off)} tensors are not llama-quantize's default {name} choice (e.g. {example})"]


def check_vocabulary(checked: GGUFHeader, reference: GGUFHeader) -> Check:
    """tokenizer.ggml.* (tokens, scores, token types, merges, special ids, add_bos …) exactly as mt writes them."""
    keys = _keys(checked, reference, lambda k: k.startswith(VOCABULARY))
    problems: list[str] = []
    for key in keys:
        mine, theirs = checked.value(key), reference.value(key)
        if isinstance(theirs, list) and isinstance(mine, list) and mine != theirs:
            problems += _list_differences(key, mine, theirs)
        else:
            problems += _differences(checked, reference, [key])
    n_tokens = len(reference.value(f"{VOCABULARY}tokens", []))
    if problems:
        return Check("vocabulary", Status.FAIL, f"{len(problems)} difference(s): " + "; ".join(problems[:3]), problems)
    return Check("vocabulary", Status.PASS, f"{n_tokens} tokens and {len(keys)} tokenizer keys equal mt's conversion of the source")


def _list_differences(key: str, mine: list, theirs: list) -> list[str]:
    field = key.removeprefix(VOCABULARY)
    out = [] if len(mine) == len(theirs) else [f"{key} has {len(mine)} entries, mt's conversion of the source {len(theirs)}"]
    wrong = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
    for i in wrong[:SHOWN]:
        a, b = mine[i], theirs[i]
        if field == "token_type":
            a, b = f"{a} ({TOKEN_TYPES.get(a, '?')})", f"{b} ({TOKEN_TYPES.get(b, '?')})"
        else:
            a, b = repr(a), repr(b)
        out.append(f"{field} {i} is {a} in the file, {b} in mt's conversion of the source")
    if len(wrong) > SHOWN:
        out.append(f"... {len(wrong) - SHOWN} more {field} entries differ")
    return out
