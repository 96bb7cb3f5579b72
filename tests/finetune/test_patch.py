"""patch_model / causal_lm_loss: tiny random Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3 (2 layers,
hidden 64, vocab 997, no tokenizer; Gemma and Phi-3 with a sliding window of 4 < the 12-token sequence, Gemma with
final-logit softcapping and eager attention, Gemma 2 with attention-logit softcapping too) patched with mt's kernels run by Triton's interpreter, against the same model unpatched (transformers +
peft): logits, loss, gradients of every LoRA A/B and of the hidden states entering the decoder.

float32: relative (Frobenius) distance <= 1e-5. bf16: two bf16 implementations of a 2-layer model differ by a
few % of the logits' norm from rounding alone (measured: transformers' own bf16 logits are about 1 % (Frobenius)
and up to 6 % (largest element) from the float64 model's), so the patched bf16 values are held to the float64 model
instead: no further from it than BF16_ERROR_RATIO x transformers' bf16 values are, and the loss within 1e-2.
The tests also count the calls that only the kernels' Triton paths make (kernel_calls), so a patch that silently
fell back to PyTorch cannot pass.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mt.errors import DeviceUnavailable  # noqa: E402
from mt.finetune.patch import (FAMILIES, PatchError, causal_lm_loss, patch, patch_model,  # noqa: E402
                               shifted_labels, unpatch_model)

VOCAB = 997
ARCHS = sorted(FAMILIES)
KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "geglu", "lora_linear", "cross_entropy")
# what each kernel module calls only on its Triton path: an autograd Function's apply, or a module function
TRITON_ONLY = {"rms_norm": "RMSNormFunction", "rope": "RopeFunction", "swiglu": "SwiGLUFunction",
               "geglu": "GeGLUFunction", "lora_linear": "LoRALinearFunction", "cross_entropy": "_chunk_triton"}
# the MLP activations of the tiny models and the kernel that computes each (from the modeling code, not patch.py)
MLP_KERNEL = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}
CONFIG_CLASS = {"Gemma3ForCausalLM": "Gemma3TextConfig"}  # Gemma3Config is the multimodal model's
SLIDING_WINDOW = 4  # < the 12-token batches: the local layers see less than the global ones
FINAL_SOFTCAP = 2.0  # the tiny models' logits reach about +-6: well into tanh's bend
ARCH_SETTINGS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(sliding_window=SLIDING_WINDOW, final_logit_softcapping=FINAL_SOFTCAP,
                              attn_logit_softcapping=3.0, attn_implementation="eager"),  # layer 0 local, 1 global
    "Gemma3ForCausalLM": dict(sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
                              final_logit_softcapping=FINAL_SOFTCAP, attn_implementation="eager"),
    "Phi3ForCausalLM": dict(sliding_window=SLIDING_WINDOW, pad_token_id=None, eos_token_id=None),  # 32000 > vocab
}
F32_TOLERANCE = 1e-5
BF16_LOSS_TOLERANCE = 1e-2
# Triton 3.6's interpreter stores float32 -> bf16 by truncation, not round-to-nearest as compiled Triton does (its
# cast_impl passes no rounding mode): measured, twice the rounding error of torch's bf16, hence 2.5 here; on a GPU
# (compiled kernels, round-to-nearest) the CUDA test holds it to 1.5 x.
BF16_ERROR_RATIO = 2.5
BF16_ERROR_RATIO_COMPILED = 1.5


def load_kernels(interpret: bool) -> None:
    """The kernel modules re-imported with TRITON_INTERPRET=1 (Triton on CPU tensors) or without (the PyTorch
    path on CPU); patch_model takes whatever sys.modules holds when it is called."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            sys.modules.pop(f"mt.kernels.{name}", None)
            importlib.import_module(f"mt.kernels.{name}")
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.fixture(scope="module", autouse=True)
def interpreted() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation on a shared machine
    load_kernels(interpret=True)
    yield
    for name in KERNEL_MODULES:
        sys.modules.pop(f"mt.kernels.{name}", None)  # a later import decorates for the real device again
    torch.set_num_threads(threads)


@pytest.fixture
def device_kernels() -> Iterator[None]:
    """The kernels as a CPU-only machine has them (no interpreter), for this test only."""
    load_kernels(interpret=False)
    yield
    load_kernels(interpret=True)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each kernel's Triton path was taken."""
    calls = {name: 0 for name in KERNEL_MODULES}
    for name in KERNEL_MODULES:
        module = sys.modules[f"mt.kernels.{name}"]
        target = getattr(module, TRITON_ONLY[name])
        owner, attr = (target, "apply") if isinstance(target, type) else (module, TRITON_ONLY[name])
        original = getattr(owner, attr)

        def counted(*args: Any, _name: str = name, _original: Callable[..., Any] = original) -> Any:
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(owner, attr, counted)
    return calls


# ---- tiny models --------------------------------------------------------------------------------------------

def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Any:
    """2 layers, hidden 64, 4 query / 2 kv heads of 16, random weights (norm weights 1 + noise, biases too)."""
    config_cls = getattr(transformers, CONFIG_CLASS.get(arch, arch.replace("ForCausalLM", "Config")))
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, **ARCH_SETTINGS.get(arch, {}))
    config = config_cls(**{**settings, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    randomize(model, seed)
    return model.to(dtype)


def randomize(model: torch.nn.Module, seed: int, only: str = "") -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only in name:
                noise = torch.randn(param.shape, generator=g) * 0.1
                param.copy_(noise + (1.0 if "norm" in name else 0.0))


def with_lora(model: Any, seed: int = 0, **config: Any) -> Any:
    """peft LoRA r=4 on all linear layers; B random too (peft starts it at zero, which would give A no gradient)."""
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**{**settings, **config}))
    randomize(peft_model, seed + 7, only="lora_B")
    return peft_model


def token_batch(seed: int, batch: int = 2, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt not trained on
    return ids, labels


# ---- forward + backward and comparisons -----------------------------------------------------------------------

@dataclass
class Outputs:
    logits: torch.Tensor
    loss: torch.Tensor
    input_grad: torch.Tensor  # d loss / d the hidden states entering the first decoder layer
    grads: dict[str, torch.Tensor]  # the trainable parameters' (LoRA A/B)


def run(model: Any, loss_of: Callable[[Any], torch.Tensor], logits_of: Callable[[Any], torch.Tensor]) -> Outputs:
    model.zero_grad(set_to_none=True)
    captured: dict[str, torch.Tensor] = {}

    def as_leaf(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        captured["x"] = out.detach().requires_grad_()
        return captured["x"]

    handle = model.get_input_embeddings().register_forward_hook(as_leaf)
    try:
        loss = loss_of(model)
        loss.backward()
    finally:
        handle.remove()
    with torch.no_grad():
        logits = logits_of(model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return Outputs(logits.detach(), loss.detach(), captured["x"].grad, grads)


def hf_loss(ids: torch.Tensor, labels: torch.Tensor, **extra: Any) -> Callable[[Any], torch.Tensor]:
    return lambda model: model(input_ids=ids, labels=labels, use_cache=False, **extra).loss


def mt_loss(ids: torch.Tensor, labels: torch.Tensor, **extra: Any) -> Callable[[Any], torch.Tensor]:
    return lambda model: causal_lm_loss(model, ids, labels, **extra)


def hf_logits(ids: torch.Tensor, **extra: Any) -> Callable[[Any], torch.Tensor]:
    return lambda model: model(input_ids=ids, use_cache=False, **extra).logits


def distance(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius; |.| for scalars)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def quantities(out: Outputs) -> dict[str, torch.Tensor]:
    return {"logits": out.logits, "loss": out.loss, "hidden grad": out.input_grad,
            **{f"grad {name}": g for name, g in out.grads.items()}}


def assert_f32_equal(got: Outputs, ref: Outputs) -> None:
    expected, actual = quantities(ref), quantities(got)
    assert actual.keys() == expected.keys()
    far = {name: d for name, value in actual.items() if (d := distance(value, expected[name])) > F32_TOLERANCE}
    assert not far, f"float32 distances over {F32_TOLERANCE}: {far}"


def aggregated(out: Outputs) -> dict[str, torch.Tensor]:
    """logits, hidden grad, and the LoRA gradients as one vector (the ratio of two small rounding errors is too
    erratic to bound per tensor, or for the scalar loss)."""
    grads = torch.cat([g.double().flatten() for _, g in sorted(out.grads.items())])
    return {"logits": out.logits, "hidden grad": out.input_grad, "LoRA grads": grads}


def assert_bf16_as_close_as_transformers(got: Outputs, ref: Outputs, exact: Outputs,
                                         ratio: float = BF16_ERROR_RATIO) -> None:
    """The patched values are no further from the float64 model than `ratio` x transformers' bf16 ones."""
    truth, theirs = aggregated(exact), aggregated(ref)
    worse = {}
    for name, value in aggregated(got).items():
        ours_error, their_error = distance(value, truth[name]), distance(theirs[name], truth[name])
        if ours_error > ratio * their_error + 1e-6:
            worse[name] = (round(ours_error, 5), round(their_error, 5))
    assert not worse, f"bf16 errors against float64 (patched, transformers): {worse}"
    assert distance(got.loss, ref.loss) <= BF16_LOSS_TOLERANCE


def mlp_kernel(config: Any) -> str:
    """The gated-MLP kernel of a config's activation (Gemma names it hidden_activation)."""
    return MLP_KERNEL[getattr(config, "hidden_act", None) or config.hidden_activation]


def expected_patches(model: Any) -> dict[str, int]:
    """What the report must list, counted from the model's structure (not from patch.py's table)."""
    from peft.tuners.lora.layer import LoraLayer

    modules = list(model.modules())
    config = model.get_base_model().config
    layers = config.num_hidden_layers
    return {"rms_norm": sum(type(m).__name__.endswith("RMSNorm") for m in modules), "rope": layers,
            mlp_kernel(config): layers, "lora_linear": sum(isinstance(m, LoraLayer) for m in modules)}


def kernels_used(model: Any) -> set[str]:
    """The kernel modules a patched forward + chunked loss of `model` must call."""
    unused = {"swiglu", "geglu"} - {mlp_kernel(model.get_base_model().config)}
    return set(KERNEL_MODULES) - unused


def patched_counts(report: Any) -> dict[str, int]:
    return {kind: len(names) for kind, names in report.patched.items()}


# ---- patched equals unpatched ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_model_equals_unpatched(arch: str, dtype: torch.dtype, kernel_calls: dict[str, int]) -> None:
    model = with_lora(tiny_model(arch, dtype, seed=len(arch)))
    ids, labels = token_batch(seed=1)
    exact = run(copy.deepcopy(model).double(), hf_loss(ids, labels), hf_logits(ids)) if dtype == torch.bfloat16 \
        else None
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))

    report = patch_model(model, kernels="triton")
    assert report.backend == "triton" and report.arch == arch and not report.fallbacks, report.lines()
    assert patched_counts(report) == expected_patches(model)
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    assert {name for name, calls in kernel_calls.items() if calls} == kernels_used(model), kernel_calls

    if dtype == torch.float32:
        assert_f32_equal(got, ref)
    else:
        assert_bf16_as_close_as_transformers(got, ref, exact)
    assert unpatch_model(model) == report.count
    assert "forward" not in vars(model.get_base_model().model.norm)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_gemma_softcap_and_sliding_window_shape_the_outputs(arch: str) -> None:
    """The tiny Gemmas exercise what the comparison above relies on: without final softcapping the loss moves,
    and with a window as long as the sequence the logits move (the local layer's window does cut attention)."""
    ids, labels = token_batch(seed=1)
    seed = len(arch)
    model = tiny_model(arch, seed=seed)
    with torch.no_grad():
        loss, logits = hf_loss(ids, labels)(model), hf_logits(ids)(model)
        uncapped = hf_loss(ids, labels)(tiny_model(arch, seed=seed, final_logit_softcapping=None))
        unwindowed = hf_logits(ids)(tiny_model(arch, seed=seed, sliding_window=ids.shape[1]))
    assert logits.abs().max() > 0.9 * FINAL_SOFTCAP  # tanh's bend is reached
    assert distance(uncapped, loss) > 1e-2
    assert distance(unwindowed, logits) > 1e-2


def test_phi3_partial_rotary_equals_unpatched(kernel_calls: dict[str, int]) -> None:
    """partial_rotary_factor 0.5: the first 8 of 16 head dims rotate, the rest pass through."""
    model = with_lora(tiny_model("Phi3ForCausalLM", seed=30, partial_rotary_factor=0.5))
    assert model.get_base_model().model.rotary_emb.inv_freq.numel() * 2 == 8
    ids, labels = token_batch(seed=31)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model, kernels="triton")
    assert patched_counts(report) == expected_patches(model) and not report.fallbacks
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    assert kernel_calls["rope"] > 0
    assert_f32_equal(got, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_row_gives_the_same_loss_patched_and_unpatched(arch: str) -> None:
    """Two samples packed in one row, position ids restarting at 0 and no mask (as mt finetune packs them)."""
    model = with_lora(tiny_model(arch, seed=3))
    lengths = (5, 7)
    ids, _ = token_batch(seed=4, batch=1, seq=sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None, :]
    labels = ids.clone()
    labels[0, [0, lengths[0]]] = -100  # each sample's first token predicts nothing from the sample before
    unpatched = hf_loss(ids, labels, position_ids=positions)(model)
    patch_model(model, kernels="triton")
    packed = mt_loss(ids, labels, position_ids=positions, kernels="triton")(model)
    assert distance(packed.detach(), unpatched.detach()) <= F32_TOLERANCE

    # and each sample alone (patched, its own forward) scores its tokens as it did packed
    total, counted = torch.zeros((), dtype=torch.float64), 0
    for start, n in zip((0, lengths[0]), lengths):
        sample_labels = labels[:, start:start + n]
        total += mt_loss(ids[:, start:start + n], sample_labels, kernels="triton", num_items_in_batch=1)(model)
        counted += int((shifted_labels(sample_labels) != -100).sum())
    assert distance(packed.detach(), total / counted) <= F32_TOLERANCE


def test_gradient_checkpointing_recomputes_the_patched_layers(kernel_calls: dict[str, int]) -> None:
    """mt finetune --grad-checkpointing: each decoder layer runs again in the backward, the in-place rope too."""
    model = with_lora(tiny_model("Qwen3ForCausalLM", seed=28))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it; peft and the trainer call this
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, labels = token_batch(seed=29)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    patch_model(model, kernels="triton")
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    assert kernel_calls["rope"] == 3 * 2 * 2  # (forward, recomputed forward, logits forward) x 2 layers x (q, k)
    assert_f32_equal(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_compiled_kernels_equal_unpatched(arch: str, dtype: torch.dtype, device_kernels: None) -> None:
    """The same comparison with the kernels compiled for the GPU (bf16 stores round to nearest there)."""
    model = with_lora(tiny_model(arch, dtype, seed=len(arch))).cuda()
    ids, labels = (t.cuda() for t in token_batch(seed=1))
    exact = run(copy.deepcopy(model).double(), hf_loss(ids, labels), hf_logits(ids))
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model, kernels="triton")
    assert report.backend == "triton" and patched_counts(report) == expected_patches(model)
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    if dtype == torch.float32:
        assert_f32_equal(got, ref)
    else:
        assert_bf16_as_close_as_transformers(got, ref, exact, ratio=BF16_ERROR_RATIO_COMPILED)


# ---- the chunked loss against transformers' -------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_chunked_loss_equals_transformers_loss(kernels: str, kernel_calls: dict[str, int]) -> None:
    """Unpatched model, everything trainable (lm_head too), a padded batch, chunks of 5 tokens."""
    model = tiny_model("LlamaForCausalLM", seed=5)
    ids, labels = token_batch(seed=6, batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[1, 6:], labels[1, 6:] = 0, -100  # right padding
    ref = run(model, hf_loss(ids, labels, attention_mask=mask), hf_logits(ids))
    got = run(model, mt_loss(ids, labels, attention_mask=mask, chunk=5, kernels=kernels), hf_logits(ids))
    assert "lm_head.weight" in got.grads and "model.norm.weight" in got.grads
    assert_f32_equal(got, ref)
    assert (kernel_calls["cross_entropy"] > 0) == (kernels == "triton")

    items = int((shifted_labels(labels) != -100).sum()) + 3  # as a gradient-accumulation step would count them
    ref = run(model, hf_loss(ids, labels, attention_mask=mask, num_items_in_batch=items), hf_logits(ids))
    got = run(model, mt_loss(ids, labels, attention_mask=mask, chunk=5, num_items_in_batch=items, kernels=kernels),
              hf_logits(ids))
    assert_f32_equal(got, ref)


def test_chunked_loss_bf16_within_tolerance() -> None:
    model = tiny_model("Qwen2ForCausalLM", torch.bfloat16, seed=8)
    ids, labels = token_batch(seed=9)
    expected = hf_loss(ids, labels)(model)
    assert distance(mt_loss(ids, labels, chunk=7, kernels="triton")(model), expected) <= BF16_LOSS_TOLERANCE


# ---- QLoRA ----------------------------------------------------------------------------------------------------

def test_qlora_nf4_base_patched_equals_unpatched(tmp_path: Path, kernel_calls: dict[str, int]) -> None:
    pytest.importorskip("bitsandbytes")
    tiny_model("Qwen2ForCausalLM", seed=10).save_pretrained(tmp_path)  # q, k, v with biases
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 quantization_config=quantization,
                                                                 device_map={"": "cpu"})
    model = with_lora(base, seed=10)
    model.train()  # in eval mode without grad, bitsandbytes repacks 4-bit weights for its CPU inference path
    ids, labels = token_batch(seed=11)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model, kernels="triton")
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(four_bit) == 14 and len(report.patched["lora_linear"]) == 14 and not report.fallbacks
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    assert kernel_calls["lora_linear"] >= 28  # 14 layers, two forwards
    assert not any(getattr(m.get_base_layer().weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    assert_f32_equal(got, ref)


# ---- fallbacks ------------------------------------------------------------------------------------------------

def test_unsupported_architecture_patches_nothing() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32)
    torch.manual_seed(12)
    model = transformers.GPT2LMHeadModel(config).eval()  # no dropout
    ids, labels = token_batch(seed=12)
    before = hf_loss(ids, labels)(model)
    report = patch_model(model, kernels="triton")
    assert report.count == 0 and report.backend == "none" and "GPT2LMHeadModel" in report.reason
    assert "none patched" in report.lines()[0]
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(causal_lm_loss(model, ids, labels), before)  # model(...).loss: the plain PyTorch path


def test_dora_and_two_adapters_fall_back_per_module(kernel_calls: dict[str, int]) -> None:
    model = with_lora(tiny_model("LlamaForCausalLM", seed=13), use_dora=True)
    ids, labels = token_batch(seed=14)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model, kernels="triton")
    assert {(f.kind, f.reason) for f in report.fallbacks} == {("lora_linear", "DoRA")}
    assert len(report.fallbacks) == 14 and "lora_linear" not in report.patched
    assert any("keeps PyTorch (lora_linear): DoRA" in line for line in report.lines())
    got = run(model, mt_loss(ids, labels, kernels="triton"), hf_logits(ids))
    assert kernel_calls["rms_norm"] and kernel_calls["rope"] and not kernel_calls["lora_linear"]
    assert_f32_equal(got, ref)

    from peft import LoraConfig

    two = with_lora(tiny_model("MistralForCausalLM", seed=15))
    two.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize(two, 16, only="lora_B.second")
    two.base_model.set_adapter(["default", "second"])
    ref = run(two, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(two, kernels="torch")
    reasons = {f.module.rsplit(".", 1)[-1]: f.reason for f in report.fallbacks}
    assert reasons == {"q_proj": "2 active adapters (the kernel takes one)",
                       "v_proj": "2 active adapters (the kernel takes one)"}
    assert len(report.patched["lora_linear"]) == 10  # k, o, gate, up, down in each layer
    assert_f32_equal(run(two, mt_loss(ids, labels, kernels="torch"), hf_logits(ids)), ref)


def test_lora_state_changed_after_patching_defers_to_peft() -> None:
    """Adapters disabled, or a second adapter made active after patch_model: peft's own forward runs."""
    model = with_lora(tiny_model("Qwen3ForCausalLM", seed=17))
    ids, _ = token_batch(seed=18)
    with model.disable_adapter(), torch.no_grad():
        base_logits = hf_logits(ids)(model)
    patch_model(model, kernels="torch")
    with model.disable_adapter(), torch.no_grad():
        assert distance(hf_logits(ids)(model), base_logits) <= F32_TOLERANCE

    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]))
    randomize(model, 19, only="lora_B.second")
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        patched = hf_logits(ids)(model)
        unpatch_model(model)
        assert distance(patched, hf_logits(ids)(model)) <= F32_TOLERANCE


def test_other_activation_and_lm_head_lora_are_listed() -> None:
    model = with_lora(tiny_model("Qwen2ForCausalLM", seed=20, hidden_act="gelu"),  # exact (erf) GELU: no kernel
                      target_modules=["q_proj", "lm_head"])
    ids, labels = token_batch(seed=21)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model, kernels="torch")
    kinds = sorted((f.kind, f.module) for f in report.fallbacks)
    assert kinds == [("loss", ""), ("mlp", "model.layers.0.mlp"), ("mlp", "model.layers.1.mlp")]
    assert "hidden_act 'gelu' has no gated-MLP kernel" in report.fallbacks[0].reason + report.fallbacks[1].reason
    assert patched_counts(report)["lora_linear"] == 3  # q_proj x2 and lm_head (used by the full-logits forward)
    assert_f32_equal(run(model, mt_loss(ids, labels, kernels="torch"), hf_logits(ids)), ref)


def test_lora_dropout_is_applied_in_training_only() -> None:
    model = with_lora(tiny_model("LlamaForCausalLM", seed=22), lora_dropout=0.5)
    ids, _ = token_batch(seed=23)
    model.eval()
    with torch.no_grad():
        ref = hf_logits(ids)(model)
    report = patch_model(model, kernels="triton")
    assert len(report.patched["lora_linear"]) == 14
    with torch.no_grad():
        assert distance(hf_logits(ids)(model), ref) <= F32_TOLERANCE
        model.train()
        assert distance(hf_logits(ids)(model), ref) > 1e-3  # half the adapter's inputs dropped


# ---- modes and bad input --------------------------------------------------------------------------------------

def test_unknown_mode_is_refused() -> None:
    model = tiny_model("LlamaForCausalLM")
    with pytest.raises(PatchError, match="kernels='fast'"):
        patch_model(model, kernels="fast")
    ids, labels = token_batch(seed=24)
    with pytest.raises(PatchError):
        causal_lm_loss(model, ids, labels, kernels="fast")


def test_triton_mode_on_cpu_without_interpreter_is_refused(device_kernels: None) -> None:
    model = with_lora(tiny_model("LlamaForCausalLM", seed=25))
    with pytest.raises(DeviceUnavailable, match="cannot run on cpu"):
        patch_model(model, kernels="triton")
    assert not any("forward" in vars(m) for m in model.modules())


def test_auto_on_cpu_takes_the_pytorch_path(device_kernels: None) -> None:
    model = with_lora(tiny_model("Qwen3ForCausalLM", seed=26))
    ids, labels = token_batch(seed=27)
    ref = run(model, hf_loss(ids, labels), hf_logits(ids))
    report = patch_model(model)
    assert report.backend == "torch" and patched_counts(report) == expected_patches(model)
    assert patch(model) == report.lines()  # the trainer's seam: the same patching, as log lines
    assert report.lines()[0].startswith("kernels: torch for Qwen3ForCausalLM: ")
    assert_f32_equal(run(model, mt_loss(ids, labels), hf_logits(ids)), ref)
