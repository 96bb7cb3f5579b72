"""A model family's record: what mt knows of it beyond its conversion, read by merge, QLoRA and finetune.

Each architecture module (mt/convert/arch/<name>.py) holds its `FAMILY` beside its `ARCH`, so adding a family
is that one file and its line in the registry's static map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DECODER_LINEAR = (*ATTENTION_LINEAR, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Kernels:
    """Where mt's training kernels go: the transformers module holding the family's classes (and its
    apply_rotary_pos_emb), the class names to patch, the attribute of the *ForCausalLM holding the decoder; how its
    norm computes (norm_style, a key of finetune.patch.NORM_FORWARDS), how its MLP holds gate and up (mlp_layout,
    a key of MLP_FORWARDS), and the config attribute naming its activation."""

    modeling: str
    norm: str
    mlp: str
    attention: str
    decoder: str = "model"
    norm_style: str = "weight_times_normed"
    mlp_layout: str = "gate_and_up"
    activation_key: str = "hidden_act"


@dataclass(frozen=True)
class Family:
    """`linear`: the decoder layer's nn.Linear modules (names after `model.layers.N.`), what LoRA targets;
    `fused`: the ones stored fused -> their parts in row order; `kernels`: None where mt does not train the
    family; `qlora`: mt reproduces the 4-bit base bitsandbytes makes of it (its Linear layers and lm_head)."""

    linear: tuple[str, ...] = ()
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    kernels: Kernels | None = None
    qlora: bool = False

    @property
    def trainable(self) -> bool:
        return bool(self.linear) and self.kernels is not None


def decoder_family(prefix: str, module: str, qlora: bool = False, **kernel_options: str) -> Family:
    """The Llama-style decoder: q, k, v, o, gate, up, down, classes named <prefix>RMSNorm, <prefix>MLP, ..."""
    kernels = Kernels(f"transformers.models.{module}.modeling_{module}", f"{prefix}RMSNorm", f"{prefix}MLP",
                      f"{prefix}Attention", **kernel_options)
    return Family(DECODER_LINEAR, kernels=kernels, qlora=qlora)
