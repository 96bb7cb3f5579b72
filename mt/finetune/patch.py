"""mt's training kernels (mt/kernels) patched into a supported causal LM, in place, and the chunked LM loss.

    report = patch_model(model, kernels="auto")      # a transformers *ForCausalLM, bare or inside a PeftModel
    loss = causal_lm_loss(model, input_ids, labels, position_ids=position_ids)

The family is found through a static map (FAMILIES, by the model's class name, else config.architectures[0]), as
the converter's registry finds its architecture modules. What each family's table names is patched:
- its RMSNorm modules (Qwen3's and Gemma 3's q_norm/k_norm too) -> rms_norm; Gemma's (1 + weight) norms with
  offset 1, in float32 and rounded once to the input's dtype, as transformers' GemmaRMSNorm computes them
- its MLP -> down(act(gate(x), up(x))), act the kernel of the family's activation (ACTIVATION_KERNELS: silu ->
  swiglu, gelu_pytorch_tanh -> geglu); Phi-3's fused gate_up_proj is chunked into [gate | up] first
- its attention: transformers' own forward, bound to module globals in which `apply_rotary_pos_emb` is mt's
  apply_rope_ (the rope step only: the attention kernel, sdpa/eager/flash, and Gemma 2's attention-logit
  softcapping and sliding windows stay transformers'); partial rotary (cos narrower than head_dim, Phi-3 with
  partial_rotary_factor < 1) rotates the leading dims and passes the rest, as transformers' Phi-3 does
- the loss (causal_lm_loss): chunked_cross_entropy, with Gemma's final_logit_softcapping when the config has one
- peft LoRA layers, lora.Linear (dense base) and lora.Linear4bit (bitsandbytes NF4/FP4 base) -> lora_linear, for
  one active plain-LoRA adapter with no or nn.Dropout dropout.
A module the kernels do not cover (DoRA and other LoRA variants, several active adapters, lora_bias,
fan_in_fan_out, another activation, another peft layer class) keeps transformers'/peft's forward and is listed in
the report; an unsupported architecture gets nothing patched and a report that says why. The LoRA forward also
checks at every call and defers to peft's forward while adapters are disabled or merged, or for adapter_names.

Each patch is an instance attribute `forward` (the class keeps its own), so other models in the process are
untouched and unpatch_model(model) restores the model.

kernels: "auto"   each kernel dispatches itself: Triton when the tensors are on CUDA (or the kernel modules were
                  imported under TRITON_INTERPRET=1), its PyTorch path otherwise (the CPU fallback);
         "triton" the same, but an error (DeviceUnavailable) unless Triton runs on the model's device;
         "torch"  the kernels' PyTorch references (the wiring without Triton).
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mt.convert.arch import families
from mt.convert.arch.family import Kernels
from mt.errors import DeviceUnavailable, MtError

MODES = ("auto", "triton", "torch")
IGNORE_INDEX = -100
# the MLP activation (config.hidden_act, or the family's activation_key) -> the gated-MLP kernel that computes it
ACTIVATION_KERNELS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu"}
ROPE_GLOBAL = "apply_rotary_pos_emb"
KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "geglu", "lora_linear", "cross_entropy")
TRITON_ENTRY = {"rms_norm": "_rms_norm_forward", "rope": "_rope_rotate", "swiglu": "_swiglu_forward",
                "geglu": "_geglu_forward", "lora_linear": "_matmul_lowrank", "cross_entropy": "_loss_and_grad_rows"}


class PatchError(MtError):
    """patch_model or causal_lm_loss was asked for something it does not do (an unknown kernels mode)."""


FAMILIES: dict[str, Kernels] = {hf_arch: f.kernels for hf_arch, f in families().items() if f.trainable and f.kernels}


@dataclass(frozen=True)
class Fallback:
    module: str  # its name in the model ("" for the model's loss)
    kind: str  # rms_norm, mlp, rope, lora_linear, loss
    reason: str


@dataclass
class PatchReport:
    arch: str
    backend: str  # "triton", "torch" (the PyTorch paths), or "none" when nothing was patched
    patched: dict[str, list[str]] = field(default_factory=dict)  # kind -> module names
    fallbacks: list[Fallback] = field(default_factory=list)
    reason: str = ""  # why nothing was patched

    @property
    def count(self) -> int:
        return sum(len(names) for names in self.patched.values())

    def lines(self) -> list[str]:
        if not self.count:
            return [f"kernels: none patched ({self.reason or 'no module matched'}); plain PyTorch"]
        kinds = ", ".join(f"{kind} x{len(names)}" for kind, names in self.patched.items())
        lines = [f"kernels: {self.backend} for {self.arch}: {kinds}"]
        return lines + [f"kernels: {f.module or 'the model'} keeps PyTorch ({f.kind}): {f.reason}"
                        for f in self.fallbacks]


@dataclass(frozen=True)
class KernelSet:
    """The callables the patched forwards call, for one mode."""
    rms_norm: Callable[..., torch.Tensor]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, cos, sin) -> rotated (q, k)
    swiglu: Callable[..., torch.Tensor]
    geglu: Callable[..., torch.Tensor]
    lora_linear: Callable[..., torch.Tensor]
    cross_entropy: Callable[..., torch.Tensor]  # (hidden, weight, labels, chunk, ignore_index, reduction, softcap)


def _kernel_modules() -> dict[str, types.ModuleType]:
    """The kernel modules as sys.modules holds them now (the tests re-import them under TRITON_INTERPRET=1)."""
    return {name: importlib.import_module(f"mt.kernels.{name}") for name in KERNEL_MODULES}


def _torch_cross_entropy(module: types.ModuleType) -> Callable[..., torch.Tensor]:
    def chunked_torch(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                      ignore_index: int, reduction: str, softcap: float | None = None) -> torch.Tensor:
        module._check(hidden, weight, labels, chunk, ignore_index, reduction, softcap)
        return module.ChunkedCrossEntropyFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                        labels.reshape(-1), chunk, ignore_index, reduction,
                                                        float(softcap or 0.0), False)
    return chunked_torch


def kernel_set(mode: str) -> KernelSet:
    m = _kernel_modules()
    if mode == "torch":
        return KernelSet(m["rms_norm"].rms_norm_reference, m["rope"].rope_reference, m["swiglu"].swiglu_reference,
                         m["geglu"].geglu_reference, m["lora_linear"].lora_linear_reference,
                         _torch_cross_entropy(m["cross_entropy"]))
    return KernelSet(m["rms_norm"].rms_norm, m["rope"].apply_rope_, m["swiglu"].swiglu, m["geglu"].geglu,
                     m["lora_linear"].lora_linear, m["cross_entropy"].chunked_cross_entropy)


def triton_runs_on(device: torch.device) -> bool:
    """Whether every kernel runs through Triton for tensors on `device`."""
    from mt.kernels._triton import triton_runs

    probe = torch.empty(0, device=device)
    return all(triton_runs(getattr(module, TRITON_ENTRY[name]), probe) for name, module in _kernel_modules().items())


def _check_mode(kernels: str) -> None:
    if kernels not in MODES:
        raise PatchError(f"kernels={kernels!r} is not a kernel mode", f"use one of {', '.join(MODES)}")


def _backend(kernels: str, device: torch.device) -> str:
    runs = triton_runs_on(device)
    if kernels == "triton" and not runs:
        raise DeviceUnavailable(f"the Triton kernels cannot run on {device} (triton missing, or not a CUDA device)",
                                "put the model on a CUDA GPU, or use kernels='auto' (PyTorch fallback)")
    return "triton" if kernels != "torch" and runs else "torch"


# ---- the model and its family ------------------------------------------------------------------------------

def base_model(model: Any) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(base: nn.Module) -> tuple[str, Kernels | None]:
    """(architecture name, its kernel family or None): the class name first, then config.architectures[0]."""
    archs = getattr(getattr(base, "config", None), "architectures", None) or []
    for name in (type(base).__name__, archs[0] if archs else None):
        if name in FAMILIES:
            return name, FAMILIES[name]
    return type(base).__name__, None


# ---- patched forwards --------------------------------------------------------------------------------------

def _weight_times_normed_forward(kernels: KernelSet) -> Callable[..., torch.Tensor]:
    """Llama's, Mistral's, Qwen's, Phi-3's RMSNorm: weight * normed, eps in variance_epsilon."""
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        # transformers returns weight * normed in the promoted dtype (float32 for a float32 weight on bf16 input)
        dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return kernels.rms_norm(hidden_states.to(dtype), self.weight, self.variance_epsilon)
    return forward


def _one_plus_weight_forward(kernels: KernelSet) -> Callable[..., torch.Tensor]:
    """Gemma's RMSNorm: normed * (1 + weight) in float32, rounded to the input's dtype, eps in eps."""
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, 1.0)
    return forward


NORM_FORWARDS: dict[str, Callable[[KernelSet], Callable[..., torch.Tensor]]] = {
    "weight_times_normed": _weight_times_normed_forward, "one_plus_weight": _one_plus_weight_forward}


def _gate_and_up_forward(gated: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x)))
    return forward


def _fused_gate_up_forward(gated: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Phi-3: gate_up_proj's output is [gate | up] along the last dim."""
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(gated(gate, up))
    return forward


MLP_FORWARDS: dict[str, Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]] = {
    "gate_and_up": _gate_and_up_forward, "fused_gate_up": _fused_gate_up_forward}


def _rope_function(kernels: KernelSet, original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if unsqueeze_dim != 1:  # q, k not [batch, heads, seq, d]
            return original(q, k, cos, sin, unsqueeze_dim)
        rotary = cos.shape[-1]
        if rotary == q.shape[-1]:
            return kernels.rope(q, k, cos, sin)  # cos, sin [batch or 1, seq, d]: one row per token, packed or not
        # partial rotary: the first `rotary` dims rotate, the rest pass (as transformers' Phi-3 concatenates them)
        q_rot, k_rot = kernels.rope(q[..., :rotary], k[..., :rotary], cos, sin)
        return torch.cat((q_rot, q[..., rotary:]), dim=-1), torch.cat((k_rot, k[..., rotary:]), dim=-1)
    return apply_rotary_pos_emb


def _attention_forward(cls: type, kernels: KernelSet) -> Callable[..., Any]:
    """cls.forward's own code, with module globals in which apply_rotary_pos_emb is mt's."""
    forward = cls.forward
    scope = dict(forward.__globals__)
    scope[ROPE_GLOBAL] = _rope_function(kernels, scope[ROPE_GLOBAL])
    patched = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__,
                                 forward.__closure__)
    patched.__kwdefaults__ = forward.__kwdefaults__
    return patched


def _attention_unsupported(cls: type) -> str | None:
    forward = cls.forward
    if not isinstance(forward, types.FunctionType) or hasattr(forward, "__wrapped__"):
        return f"{cls.__name__}.forward is wrapped; its rope step cannot be reached"
    if ROPE_GLOBAL not in forward.__code__.co_names or ROPE_GLOBAL not in forward.__globals__:
        return f"{cls.__name__}.forward does not call {ROPE_GLOBAL}"
    return None


# ---- peft LoRA layers --------------------------------------------------------------------------------------

def _lora_classes() -> dict[type, str]:
    """peft's LoRA layer classes the kernel takes: class -> base kind ("dense" or "4bit")."""
    try:
        from peft.tuners import lora
    except ImportError:
        return {}
    classes = {lora.Linear: "dense"}
    if getattr(lora, "Linear4bit", None) is not None:
        classes[lora.Linear4bit] = "4bit"
    return classes


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def _dropout_unsupported(dropout: nn.Module) -> str | None:
    return None if type(dropout) in (nn.Identity, nn.Dropout) else f"lora_dropout {type(dropout).__name__}"


def _active_adapter(layer: nn.Module) -> str:
    return next(a for a in layer.active_adapters if a in layer.lora_A)


def _lora_state_unsupported(layer: nn.Module) -> str | None:
    """What peft's forward would do differently from one plain adapter: checked at patch time and every call."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged into the base weight"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (the kernel takes one)"
    adapter = active[0]
    if adapter in layer.lora_variant:
        variant = type(layer.lora_variant[adapter]).__name__
        return "DoRA" if layer.use_dora.get(adapter) else f"LoRA variant {variant}"
    return None


def _lora_unsupported(layer: nn.Module, kind: str | None) -> str | None:
    if kind is None:
        return f"peft {type(layer).__name__} has no mt kernel"
    state = _lora_state_unsupported(layer)
    if state is not None:
        return state
    adapter = _active_adapter(layer)
    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (a transposed base weight)"
    if layer.lora_B[adapter].bias is not None:
        return "lora_bias"
    if kind == "dense" and type(base) is not nn.Linear:
        return f"base layer {type(base).__name__}"
    if kind == "4bit" and getattr(base.weight, "quant_state", None) is None:
        return "4-bit base weight without a quant_state"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight is trained (the kernel trains only A and B)"
    return _dropout_unsupported(layer.lora_dropout[adapter])


def _adapter(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, scaling, dropout probability now) of the one active adapter."""
    adapter = _active_adapter(layer)
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]), p


def _lora_dense_forward(kernels: KernelSet) -> Callable[..., torch.Tensor]:
    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or _lora_state_unsupported(self) is not None:
            return type(self).forward(self, x, *args, **kwargs)
        lora_A, lora_B, scaling, p = _adapter(self)
        base = self.get_base_layer()
        return kernels.lora_linear(x, base.weight, lora_A, lora_B, scaling, p, base.bias)
    return forward


def _lora_4bit_forward(kernels: KernelSet) -> Callable[..., torch.Tensor]:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        fix_4bit_weight_quant_state_from_module(base)
        cpu_packed = getattr(base.weight.quant_state, "packing_format_for_cpu", False)  # bnb's CPU inference layout
        if args or kwargs or cpu_packed or _lora_state_unsupported(self) is not None:
            return type(self).forward(self, x, *args, **kwargs)
        lora_A, lora_B, scaling, p = _adapter(self)
        compute = base.compute_dtype or x.dtype  # as bitsandbytes' Linear4bit: the matmul in its compute dtype
        bias = base.bias.to(compute) if base.bias is not None else None
        return kernels.lora_linear(x.to(compute), base.weight, lora_A, lora_B, scaling, p, bias).to(x.dtype)
    return forward


# ---- patch / unpatch ---------------------------------------------------------------------------------------

PATCH_MARK = "_mt_kernel_patch"


def _set_forward(module: nn.Module, forward: Callable[..., Any], kind: str) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, PATCH_MARK, kind)


class _Patcher:
    def __init__(self, base: nn.Module, family: Kernels, kernels: KernelSet, report: PatchReport) -> None:
        modeling = importlib.import_module(family.modeling)
        self.norm_cls = getattr(modeling, family.norm)
        self.mlp_cls = getattr(modeling, family.mlp)
        self.attention_cls = getattr(modeling, family.attention)
        self.base, self.family, self.kernels, self.report = base, family, kernels, report
        self.lora_classes = _lora_classes()
        self.attention_forward: Callable[..., Any] | None = None

    def patched(self, kind: str, name: str, module: nn.Module, forward: Callable[..., Any]) -> None:
        _set_forward(module, forward, kind)
        self.report.patched.setdefault(kind, []).append(name)

    def fallback(self, kind: str, name: str, reason: str) -> None:
        self.report.fallbacks.append(Fallback(name, kind, reason))

    def visit(self, name: str, module: nn.Module) -> None:
        if _is_lora_layer(module):
            self.lora(name, module)
        elif type(module) is self.norm_cls:
            self.patched("rms_norm", name, module, NORM_FORWARDS[self.family.norm_style](self.kernels))
        elif type(module) is self.mlp_cls:
            self.mlp(name, module)
        elif type(module) is self.attention_cls:
            self.attention(name, module)

    def lora(self, name: str, module: nn.Module) -> None:
        kind = self.lora_classes.get(type(module))
        reason = _lora_unsupported(module, kind)
        if reason is not None:
            return self.fallback("lora_linear", name, reason)
        make = _lora_dense_forward if kind == "dense" else _lora_4bit_forward
        self.patched("lora_linear", name, module, make(self.kernels))

    def mlp(self, name: str, module: nn.Module) -> None:
        key = self.family.activation_key
        act = getattr(self.base.config, key, None)
        kernel = ACTIVATION_KERNELS.get(act)
        if kernel is None:
            known = ", ".join(f"{a} ({k})" for a, k in ACTIVATION_KERNELS.items())
            return self.fallback("mlp", name, f"{key} {act!r} has no gated-MLP kernel (there are: {known})")
        self.patched(kernel, name, module, MLP_FORWARDS[self.family.mlp_layout](getattr(self.kernels, kernel)))

    def attention(self, name: str, module: nn.Module) -> None:
        reason = _attention_unsupported(self.attention_cls)
        if reason is not None:
            return self.fallback("rope", name, reason)
        if self.attention_forward is None:
            self.attention_forward = _attention_forward(self.attention_cls, self.kernels)
        self.patched("rope", name, module, self.attention_forward)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def patch_model(model: Any, *, kernels: str = "auto") -> PatchReport:
    """Patch `model` (a *ForCausalLM or a PeftModel around one) in place with mt's kernels; see the module doc.
    Patching again re-patches (e.g. in another mode); unpatch_model undoes it."""
    _check_mode(kernels)
    base = base_model(model)
    arch, family = family_of(base)
    if family is None:
        return PatchReport(arch, "none", reason=f"{arch} is not a family mt has kernels for "
                                                 f"({', '.join(FAMILIES)})")
    report = PatchReport(arch, _backend(kernels, _model_device(base)))
    patcher = _Patcher(base, family, kernel_set(kernels), report)
    for name, module in base.named_modules():
        patcher.visit(name, module)
    loss_reason = chunked_loss_unsupported(base)
    if loss_reason is not None:
        report.fallbacks.append(Fallback("", "loss", loss_reason))
    if not report.count:
        report.backend, report.reason = "none", f"no {arch} module matched the kernels' table"
    return report


def unpatch_model(model: Any) -> int:
    """Give every module patched by patch_model its class's forward again; returns how many."""
    count = 0
    for module in base_model(model).modules():
        if hasattr(module, PATCH_MARK):
            del module.forward
            delattr(module, PATCH_MARK)
            count += 1
    return count


def patch(model: Any) -> list[str]:
    """The trainer's seam (a family's kernel patch): patch_model in "auto" mode, the report as log lines."""
    return patch_model(model).lines()


# ---- the loss ------------------------------------------------------------------------------------------------

def chunked_loss_unsupported(base: nn.Module) -> str | None:
    """Why causal_lm_loss cannot use the chunked cross-entropy on this model (None when it can)."""
    arch, family = family_of(base)
    if family is None:
        return f"{arch} is not a family mt has kernels for"
    head = getattr(base, "lm_head", None)
    if type(head) is not nn.Linear:
        return f"lm_head is {type(head).__name__}, not a plain Linear (a LoRA on lm_head?)"
    if head.bias is not None:
        return "lm_head has a bias"
    return None


def final_logit_softcap(base: nn.Module) -> float | None:
    """Gemma 2/3's final_logit_softcapping (logits = c * tanh(logits / c)), None when the config has none."""
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return float(softcap) if softcap is not None else None


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """As transformers' ForCausalLMLoss: position t is scored on labels[t + 1]; the last position is ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                   chunk: int = 1024, ignore_index: int = IGNORE_INDEX, num_items_in_batch: int | None = None,
                   kernels: str = "auto") -> torch.Tensor:
    """transformers' causal-LM loss (mean cross-entropy of the shifted labels, or their sum / num_items_in_batch)
    from the decoder's final hidden state and lm_head's weight through chunked_cross_entropy (softcapped as the
    model's forward softcaps its logits): no [tokens, vocab] logits. A model the chunked loss does not fit (chunked_loss_unsupported) gets model(...).loss instead.
    Called without a KV cache, so packed rows (position_ids restarting per sample, no mask) stay apart."""
    _check_mode(kernels)
    base = base_model(model)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    if chunked_loss_unsupported(base) is not None:
        counted = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, labels=labels, use_cache=False, **counted).loss
    _, family = family_of(base)
    hidden = getattr(base, family.decoder)(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
    _backend(kernels, hidden.device)  # "triton" where Triton cannot run: DeviceUnavailable
    cross_entropy = kernel_set(kernels).cross_entropy
    targets = shifted_labels(labels.to(hidden.device), ignore_index)
    weight, softcap = base.lm_head.weight, final_logit_softcap(base)
    if num_items_in_batch is None:
        return cross_entropy(hidden, weight, targets, chunk, ignore_index, "mean", softcap)
    return cross_entropy(hidden, weight, targets, chunk, ignore_index, "sum", softcap) / num_items_in_batch
