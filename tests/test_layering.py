"""Packages import only downward. Every `import mt.…` in the package, at module level or inside a function, is an
arrow from one package to another; each must point to a lower layer of LAYERS."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mt"
LAYERS: list[set[str]] = [  # lowest first: a package may import its own modules and any lower layer
    {"errors", "cache"},
    {"io", "smollm2"},  # checkpoints, safetensors and GGUF reading and writing, dtypes, streaming, atomic outputs;
    # the demo's real model, fetched from the package registry
    {"quant", "kernels"},
    {"convert", "merge"},
    {"verify", "finetune", "speak"},  # speak: TADA synthesis from the converted files
    {"imatrix"},  # importance matrices from transformers' forward (verify's model builder)
    {"release"},  # convert, quantize, verify and package many files at once
    {"commands", "demo", "inspect"},  # the typed functions behind the commands
    {"cli"},
    {"__main__"},
]
SAME_LAYER = [{"convert", "merge"}]  # a merged checkpoint is convert's source; merge reads the family records


def package_of(module: str) -> str:
    return module.split(".")[1]


def arrows() -> list[tuple[str, str, str]]:
    """(file, importing package, imported package) for every import of another mt package."""
    out = []
    for path in ROOT.rglob("*.py"):
        here = package_of("mt." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("mt.") and package_of(name) != here:
                    out.append((str(path.relative_to(ROOT.parent)), here, package_of(name)))
    return out


def layer(package: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if package in members)


def allowed(source: str, target: str) -> bool:
    return layer(target) < layer(source) or any({source, target} <= group for group in SAME_LAYER)


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert packages - {"__init__"} == set().union(*LAYERS)


def test_no_import_points_up_or_sideways():
    wrong = [f"{file}: {source} imports {target}" for file, source, target in arrows() if not allowed(source, target)]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import():
    assert not allowed("quant", "convert") and not allowed("io", "quant") and not allowed("kernels", "finetune")
    assert allowed("convert", "quant") and allowed("merge", "convert") and allowed("cli", "verify")
