"""Training kernels: each a Triton kernel behind a torch.autograd.Function, with a plain PyTorch reference
beside it in the same module (`<kernel>_reference`).

    rms_norm(x, weight, eps, offset=0.0)                           RMSNorm; offset=1 for Gemma's (1 + w)
    apply_rope_(q, k, cos, sin, position_ids=None)                 RoPE on q and k in place (rotate-half)
    swiglu(gate, up)                                               silu(gate) * up
    geglu(gate, up)                                                gelu_tanh(gate) * up (Gemma's MLP)
    lora_linear(x, base_weight, lora_A, lora_B, scaling, dropout=0.0, bias=None)
                                                                   x W^T + bias + scaling (x A^T) B^T;
                                                                   W dense or bitsandbytes NF4/FP4 (decoded
                                                                   in the matmul, never dequantized in full)
    chunked_cross_entropy(hidden, lm_head_weight, labels, chunk=1024, ignore_index=-100, reduction="mean",
                          softcap=None)                            the LM loss without [tokens, vocab] logits
                                                                   (softcap: Gemma's final_logit_softcapping)

Each call runs its Triton kernel when the tensors are on a CUDA device (or when the module was imported under
TRITON_INTERPRET=1, which runs the kernels on the CPU in Triton's interpreter) and the PyTorch path otherwise.
"""

from mt.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from mt.kernels.errors import KernelInputError
from mt.kernels.geglu import geglu, geglu_reference
from mt.kernels.lora_linear import lora_linear, lora_linear_reference
from mt.kernels.rms_norm import rms_norm, rms_norm_reference
from mt.kernels.rope import apply_rope_, rope_reference
from mt.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "KernelInputError",
    "apply_rope_",
    "chunked_cross_entropy",
    "cross_entropy_reference",
    "geglu",
    "geglu_reference",
    "lora_linear",
    "lora_linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
