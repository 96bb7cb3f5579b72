"""Real PEFT adapters, written by peft 0.21.2 itself, for the tiny test checkpoints; and peft's own merge as the oracle.

Build one with `build_adapter(base_dir, out_dir, SPECS["dora"])` (or any `AdapterSpec`): the base is loaded
with transformers, wrapped with `get_peft_model`, every trainable adapter tensor is set to seeded random
values (peft starts lora_B, and lora_embedding_A, at zero, which would make every merge a no-op), and
`save_pretrained` writes the folder. `peft_merged_state_dict(base_dir, adapter_dir)` is what mt merge must
reproduce: the base in fp32, `PeftModel.from_pretrained`, `merge_and_unload()`.

Key names peft writes into adapter_model.safetensors (`P` = `base_model.model.`, the adapter name
"default" is removed; module paths are the base's, e.g. `model.layers.0.self_attn.q_proj`):
  LoRA on a Linear        P…q_proj.lora_A.weight [r, in], P…q_proj.lora_B.weight [out, r]
  lora_bias=True          also P…q_proj.lora_B.bias [out]; merged into the base's bias (bias += scaling * lora_B.bias);
                          peft refuses to merge into a layer without a bias ("Impossible to merge LoRA with
                          `lora_bias=True` because the base layer has no bias")
  DoRA (use_dora)         also P…q_proj.lora_magnitude_vector [out]  (for an Embedding: [embedding_dim])
  LoRA on embed_tokens    P…model.embed_tokens.lora_embedding_A [r, vocab], …lora_embedding_B [hidden, r]
                          (no `.weight` suffix; delta = (B @ A).T * scaling) and, because an embedding
                          layer is targeted, peft also saves P…model.embed_tokens.base_layer.weight [vocab, hidden]
  LoRA on lm_head         P…lm_head.lora_A.weight [r, hidden], P…lm_head.lora_B.weight [vocab, r], and
                          P…lm_head.base_layer.weight [vocab, hidden] (saved because lm_head is an
                          "embedding layer" name for peft); with embed_tokens targeted too, both base_layer copies
  modules_to_save=[lm_head]  P…lm_head.weight [vocab, hidden]: the whole trained copy, replaces the base tensor
  resized vocabulary      (peft compares the vocab size with the base's config.json and then saves every tensor
                          under the embedding modules)
                          - embed_tokens/lm_head in modules_to_save: P…model.embed_tokens.weight and P…lm_head.weight
                            (the trained copies, new size) and ALSO, from that embedding save, the wrapper's insides
                            P…lm_head.modules_to_save.weight (equal to P…lm_head.weight) and
                            P…lm_head.original_module.weight (the untrained resized base); the same for embed_tokens
                          - both targeted: the two `…base_layer.weight` at the new size
                          - neither (LoRA on the linears only): P…model.embed_tokens.weight and P…lm_head.weight
                          The tokenizer (with the added tokens) is saved into the adapter folder, as people do.
  rank_pattern / alpha_pattern  only in adapter_config.json (regex suffixes matched as `(.*\\.)?(KEY)$`);
                          the tensors of a module have that module's rank
  use_rslora              scaling = lora_alpha / sqrt(r) instead of lora_alpha / r
  IA3                     P…k_proj.ia3_l [out, 1] (feedforward modules: [1, in]); prompt tuning: `prompt_embeddings`
adapter_config.json has `auto_mapping` {base_model_class, parent_library} only when task_type is None;
with task_type "CAUSAL_LM" (the usual case, and the default here) the only hint of the base is
base_model_name_or_path (here: the base folder's path).

Tied embeddings (llama3_dir and qwen2_dir tie lm_head to embed_tokens; peft warns but proceeds), measured:
  * LoRA (plain or DoRA) on lm_head and/or embed_tokens: lm_head and embed_tokens are one Parameter, so
    merge_and_unload adds each delta in place to that shared tensor. The merged model stays tied
    (config tie_word_embeddings stays true) and its one embedding matrix is W + Δ_embed + Δ_lm_head: the
    lm_head delta changes the input embeddings too, and the embed_tokens delta changes the output layer. With
    DoRA on lm_head, its weight norm is taken of that shared tensor at merge time, i.e. after embed_tokens'
    delta was added (modules merge in named_modules order: embed_tokens before lm_head).
    save_pretrained then writes only model.embed_tokens.weight.
  * modules_to_save=["lm_head"]: the trained copy replaces lm_head only; merge_and_unload notices the two
    tensors diverged, unties them and sets config tie_word_embeddings=False (warning "Input and output
    embeddings are no longer tied after merging"); embed_tokens keeps the base values, and the merged model
    has a separate lm_head.weight.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADDED_TOKENS = ("<|tool_call|>", "<|think|>", "<|end_think|>")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

LORA_STD = 0.05  # A and B entries: with r=8, alpha=16 the delta's entries are ~0.03, the base's ~0.1
TRAINED_NOISE = 0.1  # relative noise on magnitude vectors and modules_to_save copies
NEW_ROW_STD = 0.1  # rows of added tokens, like the base's INIT_RANGE

OVERFLOW_TENSOR = "model.layers.0.mlp.down_proj.weight"  # its merge exceeds f16's 65504 (finite in bf16/f32)
OVERFLOW_MAGNITUDE = 1e6
NAN_TENSOR = "model.layers.1.self_attn.v_proj.weight"  # its merge holds NaN
MISSING_MODULE = "model.layers.99.self_attn.q_proj"  # the bad adapter's renamed target (base has 2 layers)
RESHAPED_MODULE = "model.layers.0.self_attn.q_proj"  # the bad adapter's in/out dims are 32 too large


@dataclass(frozen=True)
class AdapterSpec:
    """What to train: a LoraConfig's fields plus the vocabulary to add and how to store the result."""

    target_modules: tuple[str, ...] | str = LINEAR_TARGETS
    r: int = 8
    lora_alpha: float = 16
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    lora_bias: bool = False
    added_tokens: tuple[str, ...] = ()  # added to the tokenizer; embeddings resized and the new rows trained
    task_type: str | None = "CAUSAL_LM"  # None makes peft write auto_mapping.base_model_class
    base_dtype: torch.dtype | str = "auto"  # the dtype the base is trained in ("auto": the checkpoint's)
    adapter_dtype: torch.dtype | None = None  # cast the adapter tensors before saving (None: peft's fp32)
    seed: int = 0

    def lora_config(self) -> LoraConfig:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            task_type=self.task_type, target_modules=targets, r=self.r, lora_alpha=self.lora_alpha,
            lora_dropout=0.0, use_rslora=self.use_rslora, use_dora=self.use_dora,
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            modules_to_save=list(self.modules_to_save) or None, lora_bias=self.lora_bias,
        )


EMBED_LM_HEAD = ("embed_tokens", "lm_head")

# Adapters mt merge must reproduce. tests/merge/test_fixtures.py names the base each is built for (BASES).
SPECS: dict[str, AdapterSpec] = {
    "plain": AdapterSpec(),
    "all_linear_rslora": AdapterSpec(target_modules="all-linear", use_rslora=True, r=16, lora_alpha=8),
    "dora": AdapterSpec(use_dora=True),
    "patterns": AdapterSpec(
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 40},
    ),
    "embed_lm_head": AdapterSpec(target_modules=("q_proj", "v_proj", *EMBED_LM_HEAD)),
    "dora_embed_lm_head": AdapterSpec(target_modules=("q_proj", *EMBED_LM_HEAD), use_dora=True),
    "modules_to_save": AdapterSpec(target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",)),
    # peft merges lora_B.bias into the base's bias and refuses a base layer without one: Qwen2's q/k/v have biases.
    "lora_bias": AdapterSpec(target_modules=("q_proj", "k_proj", "v_proj"), lora_bias=True),
    "bf16_adapter": AdapterSpec(adapter_dtype=torch.bfloat16),
    # Resized vocabulary, the three ways peft stores the resized embeddings (see the module docstring).
    "resized_saved": AdapterSpec(added_tokens=ADDED_TOKENS, modules_to_save=EMBED_LM_HEAD),
    "resized_targeted": AdapterSpec(added_tokens=ADDED_TOKENS, target_modules=(*LINEAR_TARGETS, *EMBED_LM_HEAD)),
    "resized_auto": AdapterSpec(added_tokens=ADDED_TOKENS),
}

# For a tied-embeddings base (llama3_dir): what peft does there is in the module docstring.
TIED_SPECS: dict[str, AdapterSpec] = {
    "tied_embed_lm_head": AdapterSpec(target_modules=("q_proj", *EMBED_LM_HEAD)),
    "tied_dora_lm_head": AdapterSpec(target_modules=("q_proj", "lm_head"), use_dora=True),
    "tied_modules_to_save": AdapterSpec(target_modules=("q_proj",), modules_to_save=("lm_head",)),
}


# ---------------------------------------------------------------- building


@contextmanager
def _quiet() -> Iterator[None]:
    """peft and transformers warn about tied layers, resized vocabularies etc.; the docstring records them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_base(base_dir: Path, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    with _quiet():
        return AutoModelForCausalLM.from_pretrained(Path(base_dir), dtype=dtype)


def _resize_and_train_new_rows(model: PreTrainedModel, base_dir: Path, out_dir: Path, spec: AdapterSpec) -> None:
    """Add the tokens, grow the embeddings, give the new rows seeded values, save the tokenizer with the adapter."""
    tokenizer = AutoTokenizer.from_pretrained(Path(base_dir))
    tokenizer.add_tokens(list(spec.added_tokens), special_tokens=True)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):  # the same tensor when tied
            new = layer.weight[old_rows:]
            new.copy_(NEW_ROW_STD * torch.randn(new.shape, generator=gen))
    tokenizer.save_pretrained(out_dir)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: seeded values for every trainable tensor (the adapter's and modules_to_save copies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen).to(param.dtype)
            if ".lora_A" in name or ".lora_B" in name or ".lora_embedding_" in name:
                param.copy_(LORA_STD * noise)
            else:  # lora_magnitude_vector, modules_to_save copies, IA3 vectors: near their initial values
                param.mul_(1 + TRAINED_NOISE * noise)


def _cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def _train_and_save(model: PreTrainedModel, config: PeftConfig, out_dir: Path, seed: int,
                    adapter_dtype: torch.dtype | None = None, **save_kwargs: object) -> Path:
    with _quiet():
        peft_model = get_peft_model(model, config)
        _perturb(peft_model, seed)
        if adapter_dtype is not None:
            _cast_trainable(peft_model, adapter_dtype)
        peft_model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def build_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec = AdapterSpec()) -> Path:
    """Train (seeded stand-in) a LoRA adapter for the checkpoint in base_dir and save it with peft into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_base(base_dir, spec.base_dtype)
    if spec.added_tokens:
        _resize_and_train_new_rows(model, base_dir, out_dir, spec)
    return _train_and_save(model, spec.lora_config(), out_dir, spec.seed, spec.adapter_dtype)


# ---------------------------------------------------------------- the oracle


def _grow_for_adapter_tokenizer(model: PreTrainedModel, adapter_dir: Path) -> None:
    """As AutoPeftModelForCausalLM does: grow the embeddings when the adapter's tokenizer is larger.

    transformers would fill the new rows randomly; peft leaves them so when the adapter does not save
    them, so they are set to NaN here: a comparison can then never pass against random numbers.
    """
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return
    rows = model.get_input_embeddings().weight.shape[0]
    wanted = len(AutoTokenizer.from_pretrained(adapter_dir))
    if wanted <= rows:
        return
    model.resize_token_embeddings(wanted, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight[rows:] = float("nan")


def peft_merged_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The base loaded in `dtype`, the adapter applied by peft, merged with merge_and_unload()."""
    adapter_dir = Path(adapter_dir)
    model = load_base(base_dir, dtype)
    _grow_for_adapter_tokenizer(model, adapter_dir)
    with _quiet():
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def unaliased(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias an earlier tensor (tied lm_head.weight), as save_pretrained does."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().clone()
    return out


def peft_merged_state_dict(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What mt merge must write: peft's merged weights by HF name, tied aliases dropped (see unaliased)."""
    return unaliased(peft_merged_model(base_dir, adapter_dir, dtype).state_dict())


# ---------------------------------------------------------------- reading and editing saved adapters


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter tensors by the names peft wrote)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    return config, load_file(adapter_dir / WEIGHTS_NAME)


def _rewrite_tensors(adapter_dir: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    path = Path(adapter_dir) / WEIGHTS_NAME
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def lora_scaling(config: Mapping, module: str) -> float:
    """peft's scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA; patterns matched as peft does."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---------------------------------------------------------------- bad adapters


def _bad_shapes(base_dir: Path, out_dir: Path) -> Path:
    """RESHAPED_MODULE's A is [r, in+32] and B [out+32, r]: the rank agrees, the base's dims do not."""
    build_adapter(base_dir, out_dir)
    key = PEFT_PREFIX + RESHAPED_MODULE

    def grow(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        gen = torch.Generator().manual_seed(7)
        tensors[f"{key}.lora_A.weight"] = LORA_STD * torch.randn(a.shape[0], a.shape[1] + 32, generator=gen)
        tensors[f"{key}.lora_B.weight"] = LORA_STD * torch.randn(b.shape[0] + 32, b.shape[1], generator=gen)
        return tensors

    _rewrite_tensors(out_dir, grow)
    return out_dir


def _bad_missing_module(base_dir: Path, out_dir: Path) -> Path:
    """layers.1's q_proj pair renamed to MISSING_MODULE.

    peft loads it, warns "Found missing adapter keys" for layers.1's q_proj (left unmerged), and ignores the
    layers.99 pair without a word; merge_and_unload then succeeds.
    """
    build_adapter(base_dir, out_dir)
    old, new = PEFT_PREFIX + "model.layers.1.self_attn.q_proj.", PEFT_PREFIX + MISSING_MODULE + "."
    _rewrite_tensors(out_dir, lambda t: {k.replace(old, new): v for k, v in t.items()})
    return out_dir


def _bad_lora_bias_without_base_bias(base_dir: Path, out_dir: Path) -> Path:
    """lora_bias on Llama's bias-free projections: peft saves it, loads it, and refuses to merge it."""
    return build_adapter(base_dir, out_dir, AdapterSpec(target_modules=("q_proj",), lora_bias=True))


def _bad_ia3(base_dir: Path, out_dir: Path) -> Path:
    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    return _train_and_save(load_base(base_dir), config, Path(out_dir), seed=0)


def _bad_prompt_tuning(base_dir: Path, out_dir: Path) -> Path:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return _train_and_save(load_base(base_dir), config, Path(out_dir), seed=0)


def _bad_no_weights(base_dir: Path, out_dir: Path) -> Path:
    build_adapter(base_dir, out_dir)
    (Path(out_dir) / WEIGHTS_NAME).unlink()
    return out_dir


def _bad_no_config(base_dir: Path, out_dir: Path) -> Path:
    build_adapter(base_dir, out_dir)
    (Path(out_dir) / CONFIG_NAME).unlink()
    return out_dir


def _bad_pickle_only(base_dir: Path, out_dir: Path) -> Path:
    """adapter_model.bin (torch pickle) written by peft's save_pretrained(safe_serialization=False); peft loads it."""
    out_dir = Path(out_dir)
    spec = AdapterSpec()
    return _train_and_save(load_base(base_dir), spec.lora_config(), out_dir, spec.seed, safe_serialization=False)


def _bad_overflow_f16(base_dir: Path, out_dir: Path) -> Path:
    """OVERFLOW_TENSOR's delta scaled to a largest entry of OVERFLOW_MAGNITUDE: Inf in f16, finite in bf16/f32."""
    build_adapter(base_dir, out_dir)
    config, _ = read_adapter(out_dir)
    module = OVERFLOW_TENSOR.removesuffix(".weight")
    key = PEFT_PREFIX + module

    def blow_up(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        largest = (lora_scaling(config, module) * b.double() @ a.double()).abs().max().item()
        tensors[f"{key}.lora_B.weight"] = b * (OVERFLOW_MAGNITUDE / largest)
        return tensors

    _rewrite_tensors(out_dir, blow_up)
    return out_dir


def _bad_nan(base_dir: Path, out_dir: Path) -> Path:
    """One NaN in NAN_TENSOR's lora_A: a whole column of its merge turns NaN."""
    build_adapter(base_dir, out_dir)
    key = PEFT_PREFIX + NAN_TENSOR.removesuffix(".weight") + ".lora_A.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[key][0, 3] = float("nan")
        return tensors

    _rewrite_tensors(out_dir, poison)
    return out_dir


def _edited_config(**changes: object) -> Callable[[Path, Path], Path]:
    def build(base_dir: Path, out_dir: Path) -> Path:
        build_adapter(base_dir, out_dir)
        path = Path(out_dir) / CONFIG_NAME
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
        return out_dir
    return build


def _bad_rank_zero_tensors(base_dir: Path, out_dir: Path) -> Path:
    """One module's lora_A / lora_B with no rows / columns (rank 0)."""
    build_adapter(base_dir, out_dir)
    key = PEFT_PREFIX + NAN_TENSOR.removesuffix(".weight")

    def empty(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        tensors[f"{key}.lora_A.weight"] = a[:0].contiguous()
        tensors[f"{key}.lora_B.weight"] = b[:, :0].contiguous()
        return tensors

    _rewrite_tensors(out_dir, empty)
    return out_dir


# Each builds, for the base in base_dir, an adapter folder mt merge must refuse (or, for overflow_f16,
# refuse with --dtype f16 only), one line naming the problem.
BAD_ADAPTERS: dict[str, Callable[[Path, Path], Path]] = {
    "shape_mismatch": _bad_shapes,
    "missing_module": _bad_missing_module,
    "lora_bias_without_base_bias": _bad_lora_bias_without_base_bias,
    "ia3": _bad_ia3,
    "prompt_tuning": _bad_prompt_tuning,
    "no_weights": _bad_no_weights,
    "no_config": _bad_no_config,
    "pickle_only": _bad_pickle_only,
    "overflow_f16": _bad_overflow_f16,
    "nan": _bad_nan,
    "rank_zero": _edited_config(r=0),
    "rank_negative": _edited_config(r=-4),
    "alpha_pattern_regex": _edited_config(alpha_pattern={"q_proj(": 16}),
    "rank_zero_tensors": _bad_rank_zero_tensors,
}


def build_bad_adapter(kind: str, base_dir: Path, out_dir: Path) -> Path:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return BAD_ADAPTERS[kind](Path(base_dir), Path(out_dir))


def build_foreign_arch_adapter(foreign_base_dir: Path, out_dir: Path) -> Path:
    """An adapter trained on another architecture (pass qwen2_dir, pair the result with a Llama base).

    task_type None makes peft write auto_mapping.base_model_class ("Qwen2ForCausalLM"). The tiny Qwen2 and
    Llama checkpoints have the same hidden/head/FFN sizes, so every shape matches the Llama base and
    peft itself loads and merges it into Llama without complaint: only the metadata tells.
    """
    return build_adapter(foreign_base_dir, out_dir, AdapterSpec(task_type=None))


ALL_SPECS: dict[str, AdapterSpec] = {**SPECS, **TIED_SPECS}
# The fixture (tests/conftest.py) of the base each adapter is built for: the resized ones need a base whose vocab
# the tokenizer fills (Llama-2 SPM, 32000), lora_bias needs q/k/v biases (Qwen2), the tied ones a tied base (Llama-3).
UNTIED_F32 = "llama3_f32_untied_dir"
BASES: dict[str, str] = {
    "resized_saved": "llama2_spm_dir", "resized_targeted": "llama2_spm_dir", "resized_auto": "llama2_spm_dir",
    "lora_bias": "qwen2_dir", **{name: "llama3_dir" for name in TIED_SPECS},
}
