"""SmolLM3, OLMo 2 and Granite: the converter's bytes, logits in llama.cpp against transformers, and what each
family adds to the Llama layout proven to matter (the reference moves without it), so the agreement is not vacuous.

SmolLM3 has 4 layers so that one of them (the 4th) attends without rope; Granite carries granite-3's multipliers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mt.cli import main
from mt.convert.convert import convert
from mt.merge.merge import merge
from mt.verify.corpus import CORPUS
from mt.verify.logits import compare_logits, hf_logits, llama_cpp_logits
from mt.verify.tokens import llama_cpp_vocab_only
from tests.checkpoints import GRANITE_MULTIPLIERS, read_gguf_fields
from tests.convert.test_families_qwen3_phi3 import assert_same_top1_where_decided, prompt_ids
from tests.gguf_compare import assert_same_file
from tests.merge import adapters
from tests.merge.test_merge import max_relative_error, read_folder
from tests.oracle import run_converter, vocab_vectors

FAMILIES = ["smollm3_dir", "olmo2_dir", "granite_dir"]


@pytest.mark.parametrize("fixture, outtype", [
    ("smollm3_dir", "f16"), ("olmo2_dir", "q8_0"), ("granite_dir", "bf16"),
])
def test_same_file_as_llama_cpp_converter(request, tmp_path, fixture, outtype):
    assert_converter_bytes(request.getfixturevalue(fixture), tmp_path, outtype)


def assert_converter_bytes(src: Path, tmp_path: Path, outtype: str) -> Path:
    """mt's file of `src` at `outtype` equals llama.cpp's converter's; returns mt's."""
    convert(src, tmp_path / "mt.gguf", outtype)
    run_converter(src, tmp_path / "ref.gguf", outtype)
    assert_same_file(tmp_path / "mt.gguf", tmp_path / "ref.gguf")
    return tmp_path / "mt.gguf"


def linked_copy(src: Path, dest: Path, left_out: tuple[str, ...] = ()) -> Path:
    """`src`'s files linked into `dest`, but those named in `left_out`."""
    dest.mkdir()
    for file in src.iterdir():
        if file.name not in left_out:
            (dest / file.name).symlink_to(file)
    return dest


def edited_copy(src: Path, dest: Path, **changes: object) -> Path:
    """`src` with config.json keys changed (weights linked, not copied)."""
    linked_copy(src, dest, ("config.json",))
    config = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


# what makes each family other than Llama, switched off in the reference: its logits must then move away
WITHOUT_ITS_FEATURE = {
    "smollm3_dir": {"no_rope_layers": [1, 1, 1, 1]},
    "granite_dir": {key: 1.0 for key in GRANITE_MULTIPLIERS},
}


@pytest.mark.parametrize("fixture", FAMILIES)
def test_f32_logits_match_transformers(request, tmp_path, fixture):
    assert_f32_logits_match(request.getfixturevalue(fixture), tmp_path, WITHOUT_ITS_FEATURE.get(fixture))


def assert_f32_logits_match(src: Path, tmp_path: Path, control: dict | None) -> None:
    """llama.cpp on mt's F32 file against transformers over 48 tokens: KLD ≤ 1e-5, same top-1 where decided; with
    `control` (config keys switching the family's feature off) the reference moves 1000× further away."""
    convert(src, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(src, 48)
    ref, ours = hf_logits(src, ids), llama_cpp_logits(tmp_path / "m.gguf", ids)
    stats = compare_logits(ref, ours)
    assert stats.kld_max <= 1e-5, stats
    assert_same_top1_where_decided(ref, ours)
    if control is not None:
        plain = hf_logits(edited_copy(src, tmp_path / "plain", **control), ids)
        assert compare_logits(plain, ours).kld_max > 1000 * max(stats.kld_max, 1e-8)


def test_granite_multipliers_are_written(granite_dir, tmp_path):
    convert(granite_dir, tmp_path / "m.gguf", "f16", vocab_only=True)
    fields = read_gguf_fields(tmp_path / "m.gguf")
    assert fields["granite.embedding_scale"] == pytest.approx(12.0)
    assert fields["granite.residual_scale"] == pytest.approx(0.22)
    assert fields["granite.attention.scale"] == pytest.approx(0.0078125)
    assert fields["granite.logit_scale"] == pytest.approx(8.0)


def test_granite_tokenizer_is_llama_cpp_s_refact(granite_dir, tmp_path):
    """Granite 3's StarCoder-style tokenizer, named by its probe hash: llama.cpp's refact test vectors, and the
    corpus as transformers tokenizes it."""
    from transformers import AutoTokenizer

    convert(granite_dir, tmp_path / "v.gguf", "f16", vocab_only=True)
    assert read_gguf_fields(tmp_path / "v.gguf")["tokenizer.ggml.pre"] == "refact"
    hf = AutoTokenizer.from_pretrained(granite_dir)
    with llama_cpp_vocab_only(tmp_path / "v.gguf") as llm:
        wrong = [(text, ids) for text, ids in vocab_vectors("refact")
                 if llm.tokenize(text.encode(), add_bos=False, special=False) != ids]
        wrong += [(text, hf(text)["input_ids"]) for text in CORPUS.values()
                  if llm.tokenize(text.encode(), add_bos=False, special=True) != hf(text)["input_ids"]]
    assert not wrong, wrong[:3]


def test_smollm3_other_rope_layers_are_one_line(smollm3_dir, tmp_path):
    """llama.cpp skips rope on every 4th layer whatever config.json says: another layout is refused, no file."""
    src = edited_copy(smollm3_dir, tmp_path / "src", no_rope_layers=[1, 0, 1, 1])
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_rope_layers [1, 0, 1, 1]" in lines[0] and "every 4th layer" in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob("m.gguf*"))


@pytest.mark.parametrize("fixture", FAMILIES)
def test_merge_equals_peft_merge(request, tmp_path, fixture):
    """LoRA on every linear layer: mt merge within 1e-6 relative of peft's merge_and_unload, tensor by tensor."""
    base = request.getfixturevalue(fixture)
    adapter = adapters.build_adapter(base, tmp_path / "adapter", adapters.AdapterSpec())
    merge(base, adapter, tmp_path / "out", dtype="f32")
    got = read_folder(tmp_path / "out")
    want = adapters.unaliased(adapters.peft_merged_model(base, adapter).state_dict())
    assert set(got) == set(want) - {"model.rotary_emb.inv_freq"}
    for key in got:
        assert max_relative_error(got[key], want[key]) <= 1e-6, key
