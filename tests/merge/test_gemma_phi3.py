"""Gemma 2, Gemma 3 and Phi-3 adapters through mt convert-lora, mt merge and mt convert --adapter.

Adapters are real peft ones (get_peft_model on the tiny checkpoints of tests/checkpoints.py, every LoRA parameter
seeded nonzero). Oracles: llama.cpp's convert_lora_to_gguf.py (bytes), transformers' PeftModel (logits, run
unmerged), peft's merge_and_unload (merged weights), and llama.cpp running the files.

What the families add to the Llama/Qwen tests: Gemma's norms are written as 1 + w and an adapter must not move
them (a trained norm saved by modules_to_save goes through that offset once, in mt merge); Gemma ties its output to
the token embedding (an lm_head or embed_tokens LoRA can be merged, not given to llama.cpp as an adapter); Phi-3's
attention and gate/up projections are fused (qkv_proj, gate_up_proj), and llama.cpp keeps them fused, so a LoRA on
them is one pair whose B rows are q|k|v and gate|up in HF's order; Phi-3 is untied, so embed_tokens and lm_head LoRAs
go to llama.cpp as they are. An adapter trained on a Llama-fied (unfused) Phi-3 lands in the fused weights' slices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from mt.convert.convert import convert
from mt.merge import lora_gguf
from mt.merge.merge import merge
from mt.verify.corpus import CORPUS
from mt.verify.logits import compare_logits, llama_cpp_logits
from tests import oracle
from tests.gguf_compare import assert_same_file, read_gguf
from tests.merge import adapters
from tests.merge.test_lora_gguf import assert_clean_failure, run_cli, save_adapter, write_lora
from tests.merge.test_merge import max_relative_error, read_folder

peft = pytest.importorskip("peft")

FAMILIES = {"gemma2": "gemma2_dir", "gemma3": "gemma3_dir", "phi3": "phi3_dir"}
KLD_MAX_F16 = 1e-5  # as tests/convert/test_families_*.py for an F16 GGUF against transformers
EFFECT_FACTOR = 100  # the adapter must move the logits by far more than the limit, or agreement proves nothing
N_TOKENS = 48  # past Gemma's 16-token sliding window, so the local layers really mask


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_dir(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    return lambda family: request.getfixturevalue(FAMILIES[family])


def _cached(make: Callable[..., Any]) -> Callable[..., Any]:
    made: dict[tuple, Any] = {}

    def get(*key: Any) -> Any:
        if key not in made:
            made[key] = make(*key)
        return made[key]

    return get


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory) -> Callable[[str, str], Path]:
    """(family, kind) -> a peft adapter folder, made once. Kinds:
    all_linear    LoRA r=8 on every linear layer but lm_head (peft's "all-linear"; Phi-3: qkv_proj, gate_up_proj …)
    embed_head    Phi-3 only: all-linear + embed_tokens + lm_head (untied, so llama.cpp can apply them)
    tied          Gemma: q_proj + embed_tokens + lm_head on the tied embedding (merge only)
    trained_norm  Gemma: q_proj + modules_to_save every input_layernorm, trained (a copy the merge must offset once)
    """
    def train_norms(model: Any) -> None:
        gen = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))

    configs: dict[str, dict[str, Any]] = {
        "all_linear": dict(target_modules="all-linear"),
        "embed_head": dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"]),
        "tied": dict(target_modules=["q_proj", "embed_tokens", "lm_head"]),
        "trained_norm": dict(target_modules=["q_proj"], modules_to_save=["input_layernorm"], edit=train_norms),
    }

    def make(family: str, kind: str) -> Path:
        out = tmp_path_factory.mktemp(f"{family}-{kind}") / "adapter"
        return save_adapter(base_dir(family), out, r=8, lora_alpha=16, **configs[kind])

    return _cached(make)


@pytest.fixture(scope="module")
def base_f16(base_dir, tmp_path_factory) -> Callable[[str], Path]:
    return _cached(lambda family: convert(base_dir(family), tmp_path_factory.mktemp(f"{family}-base") / "f16.gguf", "f16").output)


@pytest.fixture(scope="module")
def prompt(base_dir) -> Callable[[str], list[int]]:
    from transformers import AutoTokenizer

    def make(family: str) -> list[int]:
        text = " ".join(CORPUS[k] for k in ("en", "de", "fr", "es", "code"))
        ids = AutoTokenizer.from_pretrained(base_dir(family))(text)["input_ids"][:N_TOKENS]
        assert len(ids) == N_TOKENS
        return ids

    return _cached(make)


@pytest.fixture(scope="module")
def peft_logits(base_dir, prompt) -> Callable[..., np.ndarray]:
    """(family, adapter or None, rounded_to=None) -> transformers' logits in float32 with eager attention (Gemma 2's
    softcapping needs it): the PeftModel unmerged, or with `rounded_to` a dtype, peft's float32 merge_and_unload with
    every parameter rounded once to that dtype (what a merged checkpoint in the base's dtype holds)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def make(family: str, adapter_dir: Path | None, rounded_to: torch.dtype | None = None) -> np.ndarray:
        model = AutoModelForCausalLM.from_pretrained(base_dir(family), dtype=torch.float32, attn_implementation="eager")
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        if rounded_to is not None:
            model = model.merge_and_unload()
            with torch.no_grad():
                for param in model.parameters():
                    param.copy_(param.to(rounded_to).float())
        with torch.no_grad():
            return model(torch.tensor([prompt(family)])).logits[0].float().numpy()

    return _cached(make)


def assert_matches_peft(family: str, ours: np.ndarray, peft_logits, adapter_dir: Path,
                        rounded_to: torch.dtype | None = None) -> float:
    """KLD per token of llama.cpp's logits against transformers' (see peft_logits) within the F16 limit, and the
    adapter's own effect on them far above it."""
    reference = peft_logits(family, adapter_dir, rounded_to)
    stats = compare_logits(reference, ours)
    assert stats.kld_max <= KLD_MAX_F16, stats
    effect = compare_logits(reference, peft_logits(family, None))
    assert effect.kld_max > EFFECT_FACTOR * KLD_MAX_F16, f"the adapter moves the logits too little: {effect}"
    return stats.kld_max


# ---------------------------------------------------------------- mt convert-lora


@pytest.mark.parametrize("family, kind, outtype", [
    ("gemma2", "all_linear", "q8_0"), ("gemma3", "all_linear", "f32"), ("phi3", "all_linear", "bf16"), ("phi3", "embed_head", "f16"),
])
def test_convert_lora_same_bytes_as_convert_lora_to_gguf(family, kind, outtype, adapter, base_dir, tmp_path):
    ours = write_lora(adapter(family, kind), base_dir(family), tmp_path / "mt.gguf", outtype)
    oracle.run_lora_converter(adapter(family, kind), base_dir(family), tmp_path / "llama.cpp.gguf", outtype)
    assert_same_file(ours, tmp_path / "llama.cpp.gguf")


@pytest.mark.parametrize("family, kind", [("gemma2", "all_linear"), ("gemma3", "all_linear"), ("phi3", "embed_head")])
def test_llama_cpp_base_plus_lora_matches_peft_model(family, kind, adapter, base_dir, base_f16, prompt, peft_logits, tmp_path):
    """F16 base GGUF + F16 LoRA GGUF in llama.cpp against PeftModel; no norm tensor in the adapter file, and Phi-3's
    fused targets are one pair each (lora_b: all of q|k|v or gate|up)."""
    lora = write_lora(adapter(family, kind), base_dir(family), tmp_path / "lora.gguf", "f16")
    names = [t.name for t in GGUFReader(lora).tensors]
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names) and not any("norm" in n for n in names)
    if family == "phi3":
        config = json.loads((base_dir(family) / "config.json").read_text())
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        shapes = {t.name: [int(x) for x in reversed(t.shape)] for t in GGUFReader(lora).tensors}
        qkv_rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
        assert shapes["blk.0.attn_qkv.weight.lora_b"] == [qkv_rows, 8]
        assert shapes["blk.0.ffn_up.weight.lora_b"] == [2 * config["intermediate_size"], 8]
        assert {"token_embd.weight.lora_a", "output.weight.lora_b"} <= set(shapes)
    ours = llama_cpp_logits(base_f16(family), prompt(family), lora=lora)
    assert_matches_peft(family, ours, peft_logits, adapter(family, kind))


def test_phi3_fused_lora_b_rows_in_wrong_order_fail(adapter, base_dir, base_f16, prompt, peft_logits, tmp_path, monkeypatch):
    """Control for the fused pairs: lora_b's rows of attn_qkv put in k|v|q order (and of ffn_up in up|gate) puts
    llama.cpp far off PeftModel, so the match above depends on the slices being where llama.cpp reads them."""
    config = json.loads((base_dir("phi3") / "config.json").read_text())
    q_rows = config["hidden_size"]

    def misplaced(arch: Any, gguf_name: str, rows: int) -> np.ndarray | None:
        if gguf_name.endswith("attn_qkv.weight"):
            return np.roll(np.arange(rows), -q_rows)
        return np.roll(np.arange(rows), rows // 2) if gguf_name.endswith("ffn_up.weight") else None

    monkeypatch.setattr(lora_gguf, "row_order", misplaced)
    bad = write_lora(adapter("phi3", "all_linear"), base_dir("phi3"), tmp_path / "misplaced.gguf", "f16")
    stats = compare_logits(peft_logits("phi3", adapter("phi3", "all_linear")),
                           llama_cpp_logits(base_f16("phi3"), prompt("phi3"), lora=bad))
    assert stats.kld_max > EFFECT_FACTOR * KLD_MAX_F16, stats


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("target, needles", [
    ("embed_tokens", ("model.embed_tokens", "ties its output", "mt merge")),
    ("lm_head", ("lm_head", "no output tensor", "mt convert BASE --adapter")),
])
def test_gemma_tied_embedding_lora_refused(family, target, needles, base_dir, tmp_path):
    """Gemma's GGUF has no output.weight: llama.cpp's converter writes an embed_tokens LoRA that llama.cpp then also
    applies to the tied output projection (ggml_mul_mat's assert aborts), and for Gemma 2 it drops an lm_head LoRA
    without a word (the file computes the model without it); mt refuses both, naming the merge."""
    made = save_adapter(base_dir(family), tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", target])
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    assert_clean_failure(run_cli(made, base_dir(family), out), out, *needles)
    if family == "gemma2" and target == "lm_head":
        oracle.run_lora_converter(made, base_dir(family), tmp_path / "llama.cpp.gguf", "f32")
        names = [t.name for t in GGUFReader(tmp_path / "llama.cpp.gguf").tensors]
        assert names and not [n for n in names if n.startswith(("output", "token_embd"))], names


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_untrained_norm_copies_written_as_the_converter_writes_them(family, base_dir, base_f16, prompt, peft_logits, tmp_path):
    """modules_to_save norms equal to the base's: convert_lora_to_gguf.py writes them (Gemma's as 1 + w, F32) ahead of
    the pairs and llama.cpp skips them; mt writes the same file, and llama.cpp runs it as PeftModel computes."""
    made = save_adapter(base_dir(family), tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear",
                        modules_to_save=["input_layernorm", "norm"])
    ours = write_lora(made, base_dir(family), tmp_path / "mt.gguf", "f16")
    oracle.run_lora_converter(made, base_dir(family), tmp_path / "llama.cpp.gguf", "f16")
    assert_same_file(ours, tmp_path / "llama.cpp.gguf")
    names = [t.name for t in GGUFReader(ours).tensors]
    norms = [n for n in names if not n.endswith((".lora_a", ".lora_b"))]
    assert names[:len(norms)] == norms and {"blk.1.attn_norm.weight", "output_norm.weight"} <= set(norms)
    assert_matches_peft(family, llama_cpp_logits(base_f16(family), prompt(family), lora=ours), peft_logits, made)


@pytest.fixture(scope="module")
def gemma2_stored_head(gemma2_dir, tmp_path_factory) -> Path:
    """gemma2_dir with lm_head.weight stored too (AutoAWQ's Gemma 2 files have it); config.json still ties them."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(gemma2_dir, tmp_path_factory.mktemp("stored") / "gemma2-stored-head"))
    tensors = load_file(base / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, base / "model.safetensors",
              metadata={"format": "pt"})
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    return base


def test_gemma2_stored_lm_head_lora_refused(gemma2_stored_head, tmp_path):
    """The converter drops that lm_head and llama.cpp ties the output to token_embd, so an lm_head LoRA is the tied
    case (not an unknown tensor)."""
    made = save_adapter(gemma2_stored_head, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    out = tmp_path / "out" / "lora.gguf"
    out.parent.mkdir()
    assert_clean_failure(run_cli(made, gemma2_stored_head, out), out, "lm_head", "no output tensor", "mt merge")


def test_stored_lm_head_of_a_tied_config_merges_as_peft_does(gemma2_stored_head, tmp_path):
    """transformers ties lm_head to the embedding whatever the file stores, so peft merges an lm_head LoRA into the
    embedding and saves no lm_head: mt merge too (it used to merge into the stored lm_head, which the converter
    drops, so mt convert --adapter lost the update)."""
    made = save_adapter(gemma2_stored_head, tmp_path / "adapter", r=4, lora_alpha=8,
                        target_modules=["q_proj", "embed_tokens", "lm_head"])
    merge(gemma2_stored_head, made, tmp_path / "out", dtype="f32")
    got, want = read_folder(tmp_path / "out"), adapters.peft_merged_state_dict(gemma2_stored_head, made)
    assert set(got) == set(want) and "lm_head.weight" not in got
    for name, tensor in want.items():
        assert max_relative_error(got[name], tensor) <= 1e-6, name


def test_gemma2_trained_lm_head_merges_but_does_not_convert(gemma2_dir, tmp_path):
    """modules_to_save=[lm_head], trained: peft unties the merged model (its own lm_head), mt merge too; llama.cpp's
    gemma2 always takes the output from token_embd and its converter drops lm_head.weight, so mt convert of that folder
    and mt convert --adapter refuse it in one line instead of writing a file without the trained head."""
    from click.testing import CliRunner

    from mt.cli import main

    def train_head(model: Any) -> None:
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.mul_(1.1)

    made = save_adapter(gemma2_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"],
                        modules_to_save=["lm_head"], edit=train_head)
    merged = tmp_path / "merged"
    merge(gemma2_dir, made, merged, dtype="f32")
    got, want = read_folder(merged), adapters.peft_merged_state_dict(gemma2_dir, made)
    assert set(got) == set(want) and "lm_head.weight" in got
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    for args in (["convert", str(merged)], ["convert", str(gemma2_dir), "--adapter", str(made)]):
        out = tmp_path / "out.gguf"
        result = CliRunner().invoke(main, [*args, "-o", str(out), "--outtype", "f16"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "tie_word_embeddings false" in lines[0], result.output
        assert "modules_to_save" in lines[0] and not out.exists()


def test_gemma_trained_norm_refused(adapter, base_dir, tmp_path):
    """A trained norm (modules_to_save) cannot ride in a llama.cpp LoRA: llama.cpp's converter writes it (offset by 1)
    and llama.cpp discards every `*_norm.weight` in an adapter, so that file computes the untrained norm."""
    out = tmp_path / "lora.gguf"
    assert_clean_failure(run_cli(adapter("gemma2", "trained_norm"), base_dir("gemma2"), out), out,
                         "input_layernorm", "differs from the base's", "mt merge")


# ---------------------------------------------------------------- mt merge and mt convert --adapter


NORM_SUFFIXES = ("norm.weight",)


@pytest.mark.parametrize("family, kind", [
    ("gemma2", "all_linear"), ("gemma3", "all_linear"), ("phi3", "embed_head"), ("gemma2", "tied"), ("gemma3", "trained_norm"),
])
def test_merge_equals_peft_merge_and_unload(family, kind, adapter, base_dir, tmp_path):
    """f32: every tensor within 1e-6 relative of peft's merge_and_unload. The base's dtype (bf16): mt sums in float32
    and rounds once, so it is peft's float32 merge rounded to bf16 (bits apart <= 1e-3 of them, where the float32 sums
    differ in the last place); peft's own bf16 merge rounds an embedding's delta to bf16 before adding it (17% of
    Phi-3's embedding bits differ, by one step), so it is compared as tests/merge/test_merge.py compares bf16 merges. Norms keep the base's values unless the adapter saves its own (modules_to_save):
    HF's w, never 1 + w."""
    base, made = base_dir(family), adapter(family, kind)
    merge(base, made, tmp_path / "f32", dtype="f32")
    got = read_folder(tmp_path / "f32")
    want = {k: v for k, v in adapters.peft_merged_state_dict(base, made).items() if "rotary_emb" not in k}
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and max_relative_error(got[name], tensor) <= 1e-6, name
    original = read_folder(base)
    for name in (n for n in got if n.endswith(NORM_SUFFIXES)):
        trained = kind == "trained_norm" and "input_layernorm" in name
        assert torch.equal(got[name], original[name].float()) != trained, name

    merge(base, made, tmp_path / "bf16")
    got16 = read_folder(tmp_path / "bf16")
    peft16 = adapters.peft_merged_state_dict(base, made, torch.bfloat16)
    for name, tensor in want.items():
        ours = got16[name].view(torch.int16).int()
        assert got16[name].dtype == torch.bfloat16, name
        assert (ours != tensor.to(torch.bfloat16).view(torch.int16).int()).float().mean().item() <= 1e-3, name
        assert max_relative_error(got16[name], peft16[name]) <= 1e-2, name


@pytest.mark.parametrize("family, kind, outtype", [
    ("gemma2", "all_linear", "f16"), ("gemma2", "tied", "q4_k_m"),
    ("gemma3", "trained_norm", "q8_0"), ("gemma3", "all_linear", "q4_k_m"),
    ("phi3", "embed_head", "f16"), ("phi3", "embed_head", "q4_k_m"),
])
def test_convert_adapter_equals_converting_the_merged_folder(family, kind, outtype, adapter, base_dir, tmp_path):
    base = base_dir(family)
    merged = tmp_path / "merged" / base.name  # the same folder name, so general.name agrees too
    merged.parent.mkdir()
    merge(base, adapter(family, kind), merged)
    convert(merged, tmp_path / "two_steps.gguf", outtype)
    convert(base, tmp_path / "on_the_fly.gguf", outtype, adapter=adapter(family, kind))
    assert_same_file(tmp_path / "on_the_fly.gguf", tmp_path / "two_steps.gguf")


@pytest.mark.parametrize("family, kind", [
    ("gemma2", "all_linear"), ("gemma2", "tied"), ("gemma3", "trained_norm"), ("phi3", "embed_head"),
])
def test_convert_adapter_logits_match_peft_model(family, kind, adapter, base_dir, base_f16, prompt, peft_logits, tmp_path):
    """mt convert --adapter at F16 in llama.cpp against peft's float32 merge rounded to the base's dtype (bf16): mt
    convert --adapter writes what mt merge + mt convert write, and mt merge keeps the base's dtype (against the
    unmerged float32 PeftModel that rounding alone costs Gemma 2 a KLD of 1.5e-5). Norms: in the file, 1 + w of the base's (or, for a
    trained copy, of the adapter's) norm, byte for byte what the base's own conversion writes when untouched."""
    out = convert(base_dir(family), tmp_path / "merged.gguf", "f16", adapter=adapter(family, kind)).output
    assert_matches_peft(family, llama_cpp_logits(out, prompt(family)), peft_logits, adapter(family, kind), torch.bfloat16)
    ours = {name: data for name, _, _, data in read_gguf(out).tensors}
    base = {name: data for name, _, _, data in read_gguf(base_f16(family)).tensors}
    for name in (n for n in base if n.endswith("norm.weight")):
        trained = kind == "trained_norm" and name.endswith("attn_norm.weight")
        assert (ours[name] == base[name]) != trained, name


# ---------------------------------------------------------------- an adapter trained on a Llama-fied Phi-3


@pytest.fixture(scope="module")
def llamafied(phi3_dir, tmp_path_factory) -> Path:
    """phi3_dir as a LlamaForCausalLM with q/k/v_proj and gate/up_proj (Unsloth's Phi-3 checkpoints are such)."""
    from tests.checkpoints import build_llamafied_phi3

    return build_llamafied_phi3(phi3_dir, tmp_path_factory.mktemp("llamafied") / "phi3-llamafied")


UNFUSED = {
    # every part, with ranks and scales that differ between the parts of one fused weight
    "all": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                rank_pattern={"k_proj": 4}, alpha_pattern={"v_proj": 32}),
    # some parts only: k_proj's and gate_proj's rows stay as they are
    "some": dict(target_modules=["q_proj", "v_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def unfused_adapter(llamafied, tmp_path_factory) -> Callable[[str], Path]:
    """task_type CAUSAL_LM, as Unsloth saves them: no base_model_class in the config, so only the shapes tell."""
    return _cached(lambda kind: save_adapter(llamafied, tmp_path_factory.mktemp(f"unfused-{kind}") / "adapter", r=8,
                                             lora_alpha=16, task_type="CAUSAL_LM", **UNFUSED[kind]))


def refused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Llama-fied Phi-3's weights by Phi-3's names: q|k|v rows into qkv_proj, gate|up into gate_up_proj."""
    out = {name: tensor for name, tensor in state.items() if not any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
    for name in (n for n in state if ".q_proj." in n):
        out[name.replace("q_proj", "qkv_proj")] = torch.cat([state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
    for name in (n for n in state if ".gate_proj." in n):
        out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([state[name], state[name.replace("gate_proj", "up_proj")]])
    return out


def test_llamafied_phi3_computes_what_phi3_computes(phi3_dir, llamafied):
    """The premise: the unfused copy is the same model (so PeftModel on it is the reference for Phi-3 + adapter)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203]])
    with torch.no_grad():
        fused, unfused = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits for d in (phi3_dir, llamafied))
    assert (fused - unfused).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", UNFUSED)
def test_unfused_adapter_merges_into_the_fused_rows(kind, phi3_dir, llamafied, unfused_adapter, tmp_path):
    """mt merge of the q/k/v/gate/up adapter into Phi-3 = peft's merge into the Llama-fied copy, fused back (f32)."""
    merge(phi3_dir, unfused_adapter(kind), tmp_path / "out", dtype="f32")
    got = read_folder(tmp_path / "out")
    want = refused({k: v for k, v in adapters.peft_merged_state_dict(llamafied, unfused_adapter(kind)).items()
                    if "rotary_emb" not in k})
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert max_relative_error(got[name], tensor) <= 1e-6, name


@pytest.mark.parametrize("kind", UNFUSED)
def test_unfused_adapter_as_llama_cpp_lora(kind, phi3_dir, llamafied, unfused_adapter, base_f16, prompt, tmp_path):
    """mt convert-lora stacks the parts' pairs into one per fused weight (A's rows, B's columns at the part's rows,
    peft's per-part scales folded into B); llama.cpp's Phi-3 + that LoRA against PeftModel on the Llama-fied copy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = write_lora(unfused_adapter(kind), phi3_dir, tmp_path / "lora.gguf", "f16")
    shapes = {t.name: [int(x) for x in reversed(t.shape)] for t in GGUFReader(lora).tensors}
    ranks = {"all": (8 + 4 + 8, 8 + 8), "some": (8 + 8, 8)}[kind]
    assert shapes["blk.0.attn_qkv.weight.lora_a"][0] == ranks[0] and shapes["blk.0.ffn_up.weight.lora_a"][0] == ranks[1]
    ids = prompt("phi3")
    model = AutoModelForCausalLM.from_pretrained(llamafied, dtype=torch.float32)
    with torch.no_grad():
        base_logits = model(torch.tensor([ids])).logits[0].numpy()
        reference = PeftModel.from_pretrained(model, str(unfused_adapter(kind)))(torch.tensor([ids])).logits[0].numpy()
    stats = compare_logits(reference, llama_cpp_logits(base_f16("phi3"), ids, lora=lora))
    assert stats.kld_max <= KLD_MAX_F16, stats
    assert compare_logits(reference, base_logits).kld_max > EFFECT_FACTOR * KLD_MAX_F16


def test_unfused_adapter_convert_adapter_equals_merged_folder(phi3_dir, unfused_adapter, tmp_path):
    merged = tmp_path / "merged" / phi3_dir.name
    merged.parent.mkdir()
    merge(phi3_dir, unfused_adapter("all"), merged)
    convert(merged, tmp_path / "two_steps.gguf", "q8_0")
    convert(phi3_dir, tmp_path / "on_the_fly.gguf", "q8_0", adapter=unfused_adapter("all"))
    assert_same_file(tmp_path / "on_the_fly.gguf", tmp_path / "two_steps.gguf")


def test_llama_cpp_converter_leaves_the_parts_unfused(phi3_dir, unfused_adapter, base_f16, tmp_path):
    """Why mt differs from convert_lora_to_gguf.py here: it writes blk.N.attn_q/attn_k/attn_v/ffn_gate LoRAs, tensors
    Phi-3's GGUF does not have, and llama.cpp refuses the adapter."""
    from tests.merge.test_lora_gguf import _llama_cpp_run

    oracle.run_lora_converter(unfused_adapter("some"), phi3_dir, tmp_path / "llama.cpp.gguf", "f32")
    assert "blk.0.attn_q.weight.lora_a" in {t.name for t in GGUFReader(tmp_path / "llama.cpp.gguf").tensors}
    run = _llama_cpp_run(base_f16("phi3"), tmp_path / "llama.cpp.gguf")
    assert "ran" not in run.stdout and "does not exist in base model" in run.stderr, run.stderr[-2000:]


def test_unfused_dora_refused(phi3_dir, llamafied, tmp_path):
    """DoRA rescales whole rows of the weight it was trained on; into a slice of the fused one mt does not merge it."""
    from click.testing import CliRunner

    from mt.cli import main

    made = save_adapter(llamafied, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["k_proj"], use_dora=True,
                         task_type="CAUSAL_LM")
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(phi3_dir), str(made), "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "DoRA" in lines[0] and "model.layers.0.self_attn.k_proj" in lines[0] and "qkv_proj" in lines[0], lines
    assert not out.exists()


def test_verify_of_an_unfused_adapter(phi3_dir, unfused_adapter, tmp_path):
    """mt verify --adapter merges through mt's merge (the source convert --adapter reads), which places a Llama-fied
    q_proj LoRA in Phi-3's fused qkv_proj: the GGUF passes against base + adapter and against mt merge's folder."""
    from click.testing import CliRunner

    from mt.cli import main

    gguf = convert(phi3_dir, tmp_path / "ft.gguf", "f16", adapter=unfused_adapter("some")).output
    short = ["--max-tokens", "64", "--ctx", "128"]
    result = CliRunner().invoke(main, ["verify", str(gguf), "--reference", str(phi3_dir), "--adapter",
                                       str(unfused_adapter("some")), *short])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged" / phi3_dir.name
    merged.parent.mkdir()
    merge(phi3_dir, unfused_adapter("some"), merged)
    result = CliRunner().invoke(main, ["verify", str(gguf), "--reference", str(merged), *short])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["verify", str(gguf), "--reference", str(phi3_dir), *short])
    assert result.exit_code == 1 and "FAIL  tensors" in result.output, result.output
