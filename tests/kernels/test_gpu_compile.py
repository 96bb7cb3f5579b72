"""Each kernel compiled for an H100 (sm_90) by Triton's own compiler, down to a cubin, with no GPU needed.

The interpreted tests check what the kernels compute; this checks that the compiled path (types, loop-carried
scalars, dot operand shapes and dtypes) is accepted, with the signatures and constexprs the wrappers launch with.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(kernel, signature: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
                     num_stages: int = 3, enable_fp_fusion: bool = True) -> dict[str, str]:
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs), target=H100,
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "enable_fp_fusion": enable_fp_fusion})
    assert compiled.asm["cubin"], "no cubin"
    return compiled.asm


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_rms_norm_kernels_compile(device_kernels, dtype):
    m = device_kernels("rms_norm")
    compile_for_h100(m._rms_norm_forward, {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                                           "rstd_ptr": "*fp32", "n_cols": "i32", "x_row_stride": "i32",
                                           "y_row_stride": "i32", "eps": "fp32", "offset": "fp32"}, {"BLOCK": 2048})
    compile_for_h100(m._rms_norm_backward, {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                                            "rstd_ptr": "*fp32", "dx_ptr": f"*{dtype}", "dw_partial_ptr": "*fp32",
                                            "n_rows": "i32", "n_cols": "i32", "dy_row_stride": "i32",
                                            "x_row_stride": "i32", "dx_row_stride": "i32", "offset": "fp32"},
                     {"ROWS_PER_PROGRAM": 8, "BLOCK": 8192}, num_warps=8)


@pytest.mark.parametrize("backward", [False, True])
def test_rope_kernel_compiles(device_kernels, backward):
    m = device_kernels("rope")
    ints = ("seq_len", "n_heads", "x_stride_b", "x_stride_h", "x_stride_s", "out_stride_b", "out_stride_h",
            "out_stride_s", "cos_row_stride")
    compile_for_h100(m._rope_rotate, {"x_ptr": "*bf16", "out_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
                                      "row_of_token_ptr": "*i32", **{name: "i32" for name in ints}},
                     {"HALF": 32, "BLOCK_H": 32, "BLOCK_HALF": 32, "BACKWARD": backward})


def test_swiglu_kernels_compile(device_kernels):
    m = device_kernels("swiglu")
    compile_for_h100(m._swiglu_forward, {"gate_ptr": "*bf16", "up_ptr": "*bf16", "h_ptr": "*bf16", "n": "i32"},
                     {"BLOCK": m.BLOCK})
    compile_for_h100(m._swiglu_backward, {"dh_ptr": "*bf16", "gate_ptr": "*bf16", "up_ptr": "*bf16",
                                          "dgate_ptr": "*bf16", "dup_ptr": "*bf16", "n": "i32"}, {"BLOCK": m.BLOCK})


def test_geglu_kernels_compile(device_kernels):
    m = device_kernels("geglu")
    compile_for_h100(m._geglu_forward, {"gate_ptr": "*bf16", "up_ptr": "*bf16", "h_ptr": "*bf16", "n": "i32",
                                        "k0": "fp32", "k1": "fp32"}, {"BLOCK": m.BLOCK})
    compile_for_h100(m._geglu_backward, {"dh_ptr": "*bf16", "gate_ptr": "*bf16", "up_ptr": "*bf16",
                                         "dgate_ptr": "*bf16", "dup_ptr": "*bf16", "n": "i32", "k0": "fp32",
                                         "k1": "fp32"}, {"BLOCK": m.BLOCK})


@pytest.mark.parametrize("dtype,adapter,precision,weight", [
    ("bf16", "fp32", "ieee", "dense"), ("bf16", "bf16", "ieee", "dense"), ("fp32", "fp32", "ieee", "dense"),
    ("fp32", "fp32", "tf32", "dense"), ("bf16", "fp32", "ieee", "nf4"), ("bf16", "bf16", "ieee", "nf4-nested"),
    ("fp32", "fp32", "ieee", "nf4-nested"), ("fp32", "fp32", "tf32", "nf4")])
def test_lora_matmul_kernel_compiles(device_kernels, dtype, adapter, precision, weight):
    """weight: a dense operand, or bitsandbytes' packed 4-bit bytes decoded in the kernel (with double-quantized
    scales: nested; dequantizing to bf16, or to f16 under f32 activations); the 4-bit launches compile without
    fused multiply-adds, as the wrapper launches them."""
    m = device_kernels("lora_linear")
    block_m, block_n, block_k, warps, stages = m.TILES[{"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]]
    strides = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_lm", "stride_lr", "stride_rr", "stride_rn",
               "stride_cm", "stride_cn")
    four_bit, nested = weight != "dense", weight.endswith("nested")
    scales = {"absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
              "code2_ptr": "*fp32", "offset_ptr": "*fp32"}
    asm = compile_for_h100(
        m._matmul_lowrank, {"a_ptr": f"*{dtype}", "b_ptr": "*u8" if four_bit else f"*{dtype}", "l_ptr": f"*{adapter}",
                            "r_ptr": f"*{adapter}", "bias_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", **scales,
                            "M": "i32", "N": "i32", "rank": "i32",
                            **{s: "i32" for s in strides}},
        {"K": 2048, "HAS_LOWRANK": True, "HAS_BIAS": True, "B_4BIT": four_bit, "NESTED": nested,
         "W_DTYPE": triton.language.bfloat16 if dtype == "bf16" else triton.language.float16, "BLOCKSIZE": 64, "BLOCKSIZE2": 256, "PRECISION": precision, "INTERPRETED": False, "BLOCK_M": block_m,
         "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_R": 16, "GROUP_M": m.GROUP_M},
        num_warps=warps, num_stages=stages, enable_fp_fusion=not four_bit)
    if nested:  # code2 * absmax2 + offset rounded twice, as bitsandbytes: .rn operations ptxas does not contract
        assert "mul.rn.f32" in asm["ptx"] and "add.rn.f32" in asm["ptx"]


@pytest.mark.parametrize("softcap", [False, True])
@pytest.mark.parametrize("write_grad", [False, True])
def test_cross_entropy_kernel_compiles(device_kernels, write_grad, softcap):
    m = device_kernels("cross_entropy")
    compile_for_h100(m._loss_and_grad_rows, {"logits_ptr": "*bf16", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                                             "row_stride": "i32", "ignore_index": "i32", "softcap": "fp32"},
                     {"V": 128256, "SOFTCAP": softcap, "WRITE_GRAD": write_grad, "BLOCK_V": m.MAX_BLOCK_V},
                     num_warps=8)
