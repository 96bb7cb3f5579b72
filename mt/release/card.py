"""The release's model card (DIST/README.md), in the layout of the Hub's GGUF repositories: front matter, a table of
the files with the quality mt verify measured, which file to take, how to run it, then the source's own card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CARD_KEYS_KEPT = ("license", "license_name", "license_link", "language")


@dataclass(frozen=True)
class CardRow:
    file: str
    outtype: str
    nbytes: int
    bits_per_weight: float
    quality: dict[str, float] | None  # kld_mean, kld_p99, top1_agreement, delta_ppl; None: not verified
    n_parts: int = 1  # a split file: `file` is its first part
    memory: tuple[tuple[int, int], ...] = ()  # (context, weights + f16 KV cache bytes) as mt.release.memory estimates


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a model card; no front matter: ({}, text)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}, text
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}, text
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]).replace("\t", "  ")) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), "\n".join(lines[end + 1:]).lstrip("\n")


def base_model(config: dict[str, Any], folder_name: str) -> str:
    """The model these files quantize: the repo id transformers saved in config.json, else the folder's name. (The
    source card's own base_model names the model the source was made from, not the source.)"""
    name_or_path = str(config.get("_name_or_path") or "")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path
    return folder_name


def front_matter(source_meta: dict[str, Any], base: str, vision: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"base_model": base, "base_model_relation": "quantized", "quantized_by": "mt"}
    meta.update({key: source_meta[key] for key in CARD_KEYS_KEPT if key in source_meta})
    tags = [t for t in source_meta.get("tags") or [] if isinstance(t, str)]
    meta["tags"] = ["gguf", "llama.cpp", *(t for t in tags if t not in ("gguf", "llama.cpp"))]
    meta["pipeline_tag"] = source_meta.get("pipeline_tag") or ("image-text-to-text" if vision else "text-generation")
    return meta


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def quality_table(rows: list[CardRow]) -> list[str]:
    lines = ["| File | Type | Size | Bits per weight | KLD mean | KLD p99 | Top-1 agreement | ΔPPL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.quality
        numbers = (f"{q['kld_mean']:.4g} | {q['kld_p99']:.4g} | {q['top1_agreement']:.1%} | {q['delta_ppl']:+.4g}"
                   if q else "not verified | | | ")
        parts = f" ({r.n_parts} parts)" if r.n_parts > 1 else ""
        lines.append(f"| [{r.file}](./{r.file}){parts} | {r.outtype.upper()} | {_size(r.nbytes)} | {r.bits_per_weight:.2f} | {numbers} |")
    return lines


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def memory_table(rows: list[CardRow]) -> list[str]:
    """What each file takes in llama.cpp (weights + f16 KV cache) at each context."""
    contexts = [n for n, _ in rows[0].memory]
    if not contexts:
        return []
    lines = ["| File | " + " | ".join(f"{_tokens(n)} tokens" for n in contexts) + " |",
             "|---|" + "---|" * len(contexts)]
    lines += [f"| {r.file} | " + " | ".join(_size(total) for _, total in r.memory) + " |" for r in rows]
    return ["Memory llama.cpp needs for the weights and an f16 KV cache (its compute buffers come on top; a q8_0 "
            "cache roughly halves the cache's share; `mt inspect FILE --memory` shows both):", "", *lines]


def which_file(rows: list[CardRow]) -> list[str]:
    """A guide from the measured numbers: the closest file, and the smallest one that stays close."""
    verified = [r for r in rows if r.quality]
    if not verified:
        return ["The files were not verified: no quality numbers to choose by."]
    closest = min(verified, key=lambda r: r.quality["kld_mean"])
    small = [r for r in verified if r.quality["top1_agreement"] >= 0.95]
    lines = [f"- Closest to the source: **{closest.file}** (KLD mean {closest.quality['kld_mean']:.4g})."]
    if small:
        smallest = min(small, key=lambda r: r.nbytes)
        lines.append(f"- Smallest that picks the source's top token at least 95% of the time: **{smallest.file}** "
                     f"({_size(smallest.nbytes)}, top-1 {smallest.quality['top1_agreement']:.1%}).")
    else:
        lines.append("- No file picks the source's top token 95% of the time; prefer the closest one.")
    return lines


def _checked(rows: list[CardRow]) -> str:
    if all(r.quality for r in rows):
        return ("Each file was checked by `mt verify`: it is mt's conversion of the source, and the numbers below are "
                "its divergence from the source (per token, against transformers in float32).")
    return "The files were not checked by `mt verify`."


def how_to_run(name: str, rows: list[CardRow], mmproj: str | None = None) -> list[str]:
    example = rows[-1].file
    if mmproj is not None:
        return [f"Images go through the projector `{mmproj}`, loaded beside any of the files:", "",
                "```", f"llama-mtmd-cli -m {example} --mmproj {mmproj} --image photo.jpg -p 'Describe this image.'",
                f"llama-server -m {example} --mmproj {mmproj} --port 8080", "```"]
    return ["```", f"llama-cli -m {example} -cnv", f"llama-server -m {example} --port 8080",
            f"printf 'FROM ./{example}\\n' > Modelfile && ollama create {name.lower()} -f Modelfile", "```"]


@dataclass(frozen=True)
class ImatrixNote:
    """The importance matrix llama.cpp's mixes were quantized with."""

    dataset: str  # the calibration text it was computed over
    chunks: int
    chunk_size: int
    shipped_as: str | None  # its file in the release, if shipped


def imatrix_sentence(note: ImatrixNote | None) -> list[str]:
    if note is None:
        return []
    where = f" It ships as `{note.shipped_as}`." if note.shipped_as else ""
    size = f"{note.chunks} chunks of {note.chunk_size} tokens" if note.chunk_size else f"{note.chunks} chunks"
    return [f"The llama.cpp mixes (Q4_K_M …) were quantized with an importance matrix computed over "
            f"`{note.dataset}` ({size}).{where}", ""]


def model_card(name: str, source_card: str | None, config: dict[str, Any], folder_name: str, rows: list[CardRow],
               imatrix: ImatrixNote | None = None, mmproj: str | None = None) -> str:
    """`mmproj`: a vision-language model's projector file in the release."""
    source_meta, source_body = split_card(source_card) if source_card else ({}, "")
    base = base_model(config, folder_name)
    parts = ["---", yaml.safe_dump(front_matter(source_meta, base, mmproj is not None), sort_keys=False, allow_unicode=True).rstrip(), "---",
             "", f"# {name} GGUF", "",
             f"GGUF files of [{base}](https://huggingface.co/{base}) for llama.cpp and the tools built on it, written by mt "
             f"from one read of the checkpoint. {_checked(rows)}", "", *imatrix_sentence(imatrix), *quality_table(rows), "", "## Which file", "", *which_file(rows), "",
             *memory_table(rows), "", "## Run", "",
             *how_to_run(name, rows, mmproj)]
    if source_body.strip():
        parts += ["", "## Original model card", "", source_body.rstrip()]
    return "\n".join(parts) + "\n"


def read_source_card(folder: Path) -> str | None:
    path = folder / "README.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None
