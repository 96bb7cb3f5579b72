"""--dequantized-base: merging onto the base as bitsandbytes' 4-bit quantization gives it back.

Oracle: transformers loads the 16-bit base with BitsAndBytesConfig on the CPU; each Linear4bit weight is
dequantized with bitsandbytes.functional.dequantize_4bit(w.data, w.quant_state), and the LoRA delta
B @ A * alpha / r is added here with torch in float32, cast once to the checkpoint's dtype.
Tolerance: one unit in the last place of the output dtype (bf16: relative 2^-7, f32: 2^-23 of the largest
weight), for float32 rounding of B @ A in numpy vs torch; dequantized weights the adapter leaves alone must
be bit-identical.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from mt.io.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from mt.io.dtypes import to_f32# noqa: E402
from mt.errors import AdapterError, CheckpointError, DeviceUnavailable  # noqa: E402
from mt.merge.adapter import open_adapter  # noqa: E402
from mt.merge.merged import merge_checkpoint  # noqa: E402
from mt.merge.qlora import dequantized_base, dequantized_checkpoint, merge_base, quantized_weights  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
RANK, ALPHA = 4, 8


# ---------------------------------------------------------------- builders and oracle


def build_adapter(base: Path, out: Path, targets: list[str], seed: int = 0) -> Path:
    """A PEFT LoRA adapter on `base` with seeded nonzero lora_B (peft initialises it to zero)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    lora.save_pretrained(out, save_embedding_layers=False)
    return out


@functools.lru_cache(maxsize=4)
def bnb_model(base: Path, quant_type: str = "nf4", double_quant: bool = True, dtype: torch.dtype | None = None,
              skip: tuple[str, ...] | None = None, device: str = "cpu") -> torch.nn.Module:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                llm_int8_skip_modules=list(skip) if skip is not None else None)
    extra = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map=device, **extra)


def bnb_dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each Linear4bit weight of a model transformers loaded in 4 bits, dequantized by bitsandbytes."""
    return {name + ".weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).cpu()
            for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def oracle_merge(base: Path, adapter: Path | None, dequantized: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base with its 4-bit weights dequantized and the LoRA delta added in float32, in the checkpoint's dtypes."""
    stored = load_file(base / "model.safetensors")
    merged = {name: t.float() for name, t in stored.items()}
    merged.update({name: t.float() for name, t in dequantized.items()})
    if adapter is not None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        lora = load_file(adapter / "adapter_model.safetensors")
        for key, a in lora.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                merged[module + ".weight"] = merged[module + ".weight"] + (b.float() @ a.float()) * (config["lora_alpha"] / config["r"])
    return {name: merged[name].to(stored[name].dtype) for name in stored}


def as_f32(tensor) -> np.ndarray:
    return to_f32(tensor.read(), tensor.dtype)


def assert_merged(ckpt: Checkpoint, want: dict[str, torch.Tensor], exact: set[str]) -> None:
    assert sorted(ckpt.tensors) == sorted(want)
    for name, tensor in ckpt.tensors.items():
        expected = want[name].float().numpy()
        got = as_f32(tensor)
        assert got.shape == expected.shape, name
        if name in exact:
            assert np.array_equal(got, expected), name
        elif tensor.dtype == "BF16":
            assert (np.abs(got - expected) <= 2.0**-7 * np.abs(expected)).all(), name
        else:
            assert np.abs(got - expected).max() <= 2.0**-23 * np.abs(expected).max(), name


def merged_with(base: Path, adapter: Path, **options) -> Checkpoint:
    ckpt = open_checkpoint(base)
    return merge_checkpoint(ckpt, open_adapter(adapter), wrap_base=dequantized_base(ckpt, **options))


@pytest.fixture(scope="module")
def llama2_adapter(llama2_spm_dir, tmp_path_factory) -> Path:
    return build_adapter(llama2_spm_dir, tmp_path_factory.mktemp("adapter") / "lora", TARGETS)


# ---------------------------------------------------------------- which weights


@pytest.mark.parametrize("fixture, skip", [
    ("llama2_spm_dir", None),  # untied: lm_head stays 16-bit
    ("llama3_dir", None),  # tied embeddings
    ("qwen2_dir", None),  # q/k/v biases stay 16-bit
    ("llama2_spm_dir", ("down_proj", "model.layers.1.self_attn")),  # a skip list replaces the defaults: lm_head is quantized
])
def test_quantized_weights_are_transformers_linear4bit(request, fixture, skip):
    base = request.getfixturevalue(fixture)
    want = set(bnb_dequantized(bnb_model(base, skip=skip)))
    got = quantized_weights(open_checkpoint(base), skip)
    assert got == want
    assert ("lm_head.weight" in got) == (skip is not None)


# ---------------------------------------------------------------- merged values


@pytest.mark.parametrize("quant_type, double_quant, dtype", [
    ("nf4", True, None), ("nf4", False, None), ("fp4", True, None), ("fp4", False, None),
    ("nf4", True, "f16"),  # loaded with dtype=torch.float16: transformers casts the bf16 weights before quantizing
])
def test_merge_onto_dequantized_base_equals_bitsandbytes(llama2_spm_dir, llama2_adapter, quant_type, double_quant, dtype):
    torch_dtype = {None: None, "f16": torch.float16}[dtype]
    dequantized = bnb_dequantized(bnb_model(llama2_spm_dir, quant_type, double_quant, torch_dtype))
    want = oracle_merge(llama2_spm_dir, llama2_adapter, dequantized)
    got = merged_with(llama2_spm_dir, llama2_adapter, quant_type=quant_type, double_quant=double_quant, dtype=dtype)
    untouched = {n for n in dequantized if not any(f".{t}." in n for t in TARGETS)}
    assert_merged(got, want, exact=untouched)


def test_dequantized_weights_equal_bitsandbytes_bit_for_bit(llama2_spm_dir):
    model = bnb_model(llama2_spm_dir)
    ckpt = open_checkpoint(llama2_spm_dir)
    wrap = dequantized_base(ckpt)
    for name, want in bnb_dequantized(model).items():
        tensor = wrap(name, ckpt.tensors[name])
        assert tensor.dtype == "BF16" and tensor.shape == tuple(want.shape)
        bits = want.view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(tensor.read(), bits), name
        assert np.array_equal(tensor.read_rows(3, len(bits) - 2), bits[3:-2]), name


def test_merge_onto_f32_base(llama3_f32_untied_dir, tmp_path):
    adapter = build_adapter(llama3_f32_untied_dir, tmp_path / "lora", ["k_proj", "up_proj", "o_proj"], seed=3)
    dequantized = bnb_dequantized(bnb_model(llama3_f32_untied_dir))
    want = oracle_merge(llama3_f32_untied_dir, adapter, dequantized)
    got = merged_with(llama3_f32_untied_dir, adapter)
    assert all(t.dtype == "F32" for t in got.tensors.values())
    assert_merged(got, want, exact={n for n in dequantized if not any(p in n for p in ("k_proj", "up_proj", "o_proj"))})


def test_default_merge_is_onto_the_16_bit_weights(llama2_spm_dir, llama2_adapter):
    ckpt = open_checkpoint(llama2_spm_dir)
    quantized = quantized_weights(ckpt)
    default = merge_checkpoint(ckpt, open_adapter(llama2_adapter))
    onto_4bit = merged_with(llama2_spm_dir, llama2_adapter)
    want_default = oracle_merge(llama2_spm_dir, llama2_adapter, {})
    assert_merged(default, want_default, exact=set())
    for name in ckpt.tensors:
        a, b = as_f32(default.tensors[name]), as_f32(onto_4bit.tensors[name])
        if name in quantized:  # the 4-bit error: a few percent of each weight
            assert np.abs(a - b).mean() > 0.02 * np.abs(a).mean(), name
        else:  # embeddings, norms, lm_head (merged in 16 bits both ways)
            assert np.array_equal(a, b), name


def test_options_change_the_weights(llama2_spm_dir):
    ckpt = open_checkpoint(llama2_spm_dir)
    name = "model.layers.0.mlp.up_proj.weight"

    def read(**options) -> np.ndarray:
        return as_f32(dequantized_base(ckpt, **options)(name, ckpt.tensors[name]))

    nf4, fp4, single = read(), read(quant_type="fp4"), read(double_quant=False)
    original = as_f32(ckpt.tensors[name])
    assert not np.array_equal(nf4, fp4) and not np.array_equal(nf4, single) and not np.array_equal(nf4, original)
    assert len(np.unique(nf4[0, :64] / np.abs(nf4[0, :64]).max())) <= 16  # one block: 16 code values at most


def flat_block_reference(weight: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = True,
                         quant_storage: torch.dtype = torch.uint8) -> np.ndarray:
    """quantize_4bit's codes decoded by hand: code value x absmax of the element's block in the flat tensor, as
    bitsandbytes' CUDA kernels and its pure-torch backend decode them. (Its CPU kernel restarts the blocks at every
    row, so it misreads weights whose rows are not a multiple of the block size: e.g. blocksize 128, rows of 64.)"""
    codes, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=double_quant, quant_storage=quant_storage)
    absmax = state.absmax
    if double_quant:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = codes.view(torch.uint8).reshape(-1).numpy()
    nibbles = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:weight.numel()]
    table = bnb.functional.get_4bit_type(quant_type, device="cpu").numpy()
    values = table[nibbles] * absmax.float().numpy()[np.arange(weight.numel()) // blocksize]
    return values.reshape(weight.shape).astype(np.float32)


def test_block_size_storage_and_dtype_as_bitsandbytes(llama2_spm_dir):
    """Options transformers does not expose, against bitsandbytes' quantize_4bit called directly."""
    ckpt = open_checkpoint(llama2_spm_dir)
    name = "model.layers.1.self_attn.o_proj.weight"
    tensor = dequantized_base(ckpt, blocksize=128, quant_storage="bfloat16", dtype="f32", double_quant=False)(name, ckpt.tensors[name])
    weight = torch.from_numpy(as_f32(ckpt.tensors[name]))
    assert tensor.dtype == "F32"
    assert np.array_equal(tensor.read(), flat_block_reference(weight, "nf4", 128, False, torch.bfloat16))


def one_linear_base(folder: Path, weight: torch.Tensor) -> tuple[Checkpoint, str]:
    """A float32 Llama checkpoint holding one down_proj weight."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}))
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({name: weight}, folder / "model.safetensors")
    return open_checkpoint(folder), name


@pytest.mark.parametrize("shape", [(5, 96), (7, 33), (3, 128), (9, 64)])
def test_rows_across_block_boundaries(tmp_path, shape):
    """Blocks run across rows when a row is not a multiple of the block; every slab of rows reads the same values."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    ckpt, name = one_linear_base(tmp_path / "base", weight)
    tensor = dequantized_base(ckpt, quant_type="fp4")(name, ckpt.tensors[name])
    want = flat_block_reference(weight, "fp4")
    assert np.array_equal(tensor.read(), want)
    for start in range(shape[0]):
        for stop in range(start, shape[0] + 1):
            assert np.array_equal(tensor.read_rows(start, stop), want[start:stop]), (start, stop)


# ---------------------------------------------------------------- bases saved in 4 bits


@functools.lru_cache(maxsize=2)
def saved_4bit(base: Path, quant_type: str, double_quant: bool) -> Path:
    out = base.parent / f"{base.name}-bnb-{quant_type}-{int(double_quant)}"
    if not out.exists():
        bnb_model(base, quant_type, double_quant).save_pretrained(out)
    return out


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_prequantized_base_reads_as_bitsandbytes_dequantizes_it(llama2_spm_dir, llama2_adapter, quant_type, double_quant):
    saved = open_checkpoint(saved_4bit(llama2_spm_dir, quant_type, double_quant))
    assert any(t.dtype == "U8" for t in saved.tensors.values()) and "quantization_config" in saved.config
    plain = open_checkpoint(llama2_spm_dir)
    base, wrap = merge_base(saved, dequantized=True)
    assert wrap is None and "quantization_config" not in base.config
    dequantized = bnb_dequantized(bnb_model(llama2_spm_dir, quant_type, double_quant))
    assert_merged(base, oracle_merge(llama2_spm_dir, None, dequantized), exact=set(plain.tensors))
    on_the_fly = merge_checkpoint(plain, open_adapter(llama2_adapter),
                                  wrap_base=dequantized_base(plain, quant_type=quant_type, double_quant=double_quant))
    merged = merge_checkpoint(base, open_adapter(llama2_adapter))
    for name, tensor in merged.tensors.items():
        assert tensor.dtype == plain.tensors[name].dtype
        assert np.array_equal(tensor.read(), on_the_fly.tensors[name].read()), name
    assert_merged(merged, oracle_merge(llama2_spm_dir, llama2_adapter, dequantized), exact=set())


def test_prequantized_base_without_dequantized_base_is_refused(llama2_spm_dir):
    saved = open_checkpoint(saved_4bit(llama2_spm_dir, "nf4", True))
    with pytest.raises(AdapterError, match="no 16-bit weights to merge into") as info:
        merge_base(saved, dequantized=False)
    assert "pass the 16-bit base model" in info.value.one_line()


def test_plain_base_passes_through(llama2_spm_dir):
    ckpt = open_checkpoint(llama2_spm_dir)
    assert merge_base(ckpt, dequantized=False) == (ckpt, None)
    base, wrap = merge_base(ckpt, dequantized=True, quant_type="fp4")
    assert base is ckpt and wrap is not None


def _damaged(ckpt: Checkpoint, how: str) -> Checkpoint:
    weight = "model.layers.0.self_attn.q_proj.weight"
    tensors = dict(ckpt.tensors)
    if how == "missing absmax":
        del tensors[weight + ".absmax"]
    elif how == "missing weight":
        del tensors[weight]
    elif how == "stray part":
        tensors["model.layers.0.mlp.extra.weight.absmax"] = tensors[weight + ".absmax"]
    elif how == "state not json":
        tensors[weight + ".quant_state.bitsandbytes__nf4"] = tensors[weight + ".absmax"]
    elif how == "short weight":
        tensors[weight] = tensors[weight + ".absmax"]
    elif how == "bad quant map":
        tensors[weight + ".quant_map"] = tensors["model.norm.weight"]
    return replace(ckpt, tensors=tensors)


@pytest.mark.parametrize("how, message", [
    ("missing absmax", "lacks absmax"),
    ("missing weight", "has no 4-bit weight beside it"),
    ("stray part", "has no 4-bit weight beside it"),
    ("state not json", "not bitsandbytes' JSON quantization state"),
    ("short weight", "bytes for 4096 weights"),
])
def test_damaged_prequantized_base(llama2_spm_dir, how, message):
    saved = open_checkpoint(saved_4bit(llama2_spm_dir, "nf4", True))
    with pytest.raises(CheckpointError, match=message) as info:
        dequantized_checkpoint(_damaged(saved, how))
    assert "save the 4-bit model again" in info.value.one_line()


@pytest.mark.parametrize("quantization, message", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes 8-bit-quantized weights"),
    ({"quant_method": "gptq", "bits": 4}, "gptq-quantized weights"),
])
@pytest.mark.parametrize("dequantized", [False, True])
def test_other_quantized_bases_are_refused(llama2_spm_dir, quantization, message, dequantized):
    ckpt = open_checkpoint(llama2_spm_dir)
    ckpt = replace(ckpt, config={**ckpt.config, "quantization_config": quantization})
    with pytest.raises(AdapterError, match=message) as info:
        merge_base(ckpt, dequantized=dequantized)
    assert "pass the unquantized base model" in info.value.one_line()


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("options, message", [
    ({"quant_type": "int4"}, "quant type 'int4' does not exist; use nf4 or fp4"),
    ({"blocksize": 100}, "no 4-bit block size 100; use one of 32, 64, 128"),
    ({"quant_storage": "int4"}, "cannot store 4-bit weights as 'int4'"),
    ({"dtype": "f64"}, "not 'f64'"),
    ({"skip_modules": ["mlp.(gate"]}, "not a valid pattern"),
])
def test_bad_options(llama2_spm_dir, options, message):
    with pytest.raises(AdapterError) as info:
        dequantized_base(open_checkpoint(llama2_spm_dir), **options)
    assert message in info.value.one_line()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")
def test_cuda_without_a_gpu(llama2_spm_dir):
    with pytest.raises(DeviceUnavailable, match="sees no CUDA GPU"):
        dequantized_base(open_checkpoint(llama2_spm_dir), device="cuda")


def test_not_a_device(llama2_spm_dir):
    with pytest.raises(AdapterError, match="'gpu0' is not a torch device"):
        dequantized_base(open_checkpoint(llama2_spm_dir), device="gpu0")


def test_bitsandbytes_cannot_quantize(tmp_path):
    """150 weights pack into 75 bytes, which bitsandbytes cannot store as float64."""
    ckpt, name = one_linear_base(tmp_path / "base", torch.randn(3, 50))
    tensor = dequantized_base(ckpt, quant_storage="float64")(name, ckpt.tensors[name])
    with pytest.raises(AdapterError, match="bitsandbytes cannot quantize model.layers.0.mlp.down_proj.weight on cpu"):
        tensor.read()


def test_unknown_architecture(llama2_spm_dir):
    ckpt = open_checkpoint(llama2_spm_dir)
    ckpt = replace(ckpt, config={**ckpt.config, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(AdapterError, match="which layers of a GPT2LMHeadModel bitsandbytes quantizes"):
        dequantized_base(ckpt)


def test_missing_bitsandbytes(llama2_spm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(AdapterError) as info:
        dequantized_base(open_checkpoint(llama2_spm_dir))
    assert "pip install bitsandbytes" in info.value.one_line()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_on_cuda_equals_transformers_on_cuda(llama2_spm_dir):
    """QLoRA training quantizes on the GPU; device='cuda' quantizes there too."""
    ckpt = open_checkpoint(llama2_spm_dir)
    wrap = dequantized_base(ckpt, device="cuda")
    for name, want in bnb_dequantized(bnb_model(llama2_spm_dir, device="cuda")).items():
        assert np.array_equal(wrap(name, ckpt.tensors[name]).read(), want.view(torch.int16).numpy().view(np.uint16)), name


# ---------------------------------------------------------------- through the commands


def test_merge_command_dequantized_base(llama2_spm_dir, llama2_adapter, tmp_path):
    """mt merge --dequantized-base writes what merge_checkpoint gives with bitsandbytes' round trip, and differs
    from the default merge onto the 16-bit weights."""
    from click.testing import CliRunner

    from mt.cli import main
    from mt.io.safetensors import read_header

    def load_file(path: Path) -> dict[str, np.ndarray]:
        return {name: ref.read() for name, ref in read_header(path)[0].items()}

    for flag, out in (("--dequantized-base", tmp_path / "dq"), (None, tmp_path / "plain")):
        args = ["merge", str(llama2_spm_dir), str(llama2_adapter), "-o", str(out), "--quiet"] + ([flag] if flag else [])
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    dq, plain = load_file(tmp_path / "dq" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    want = merged_with(llama2_spm_dir, llama2_adapter)
    for name, tensor in want.tensors.items():
        assert np.array_equal(dq[name], tensor.read()), name
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(dq[q0], plain[q0])


def test_merge_command_refuses_a_4bit_base_without_the_flag(llama2_spm_dir, llama2_adapter, tmp_path):
    from click.testing import CliRunner

    from mt.cli import main

    saved = saved_4bit(llama2_spm_dir, "nf4", True)
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["merge", str(saved), str(llama2_adapter), "-o", str(out)])
    assert result.exit_code == 1 and "no 16-bit weights to merge into" in result.output and not out.exists()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):  # as a hub 4-bit upload has them
        if (llama2_spm_dir / name).is_file() and not (saved / name).is_file():
            shutil.copy(llama2_spm_dir / name, saved / name)
    result = CliRunner().invoke(main, ["convert", str(saved), "--adapter", str(llama2_adapter), "--dequantized-base",
                                       "-o", str(tmp_path / "m.gguf"), "--outtype", "q8_0", "--quiet"])
    assert result.exit_code == 0, result.output
