"""LoRA linear on a bitsandbytes 4-bit base (NF4/FP4), decoded inside the Triton matmul (interpreted), against
bitsandbytes' own dequantization: the decoded weight bit for bit, the layer's output and gradients within the
dtype tolerances of test_lora_linear.py, no tensor of W's dense size ever made, and the layouts it refuses.

The oracle is bitsandbytes: functional.dequantize_4bit, whose 4-bit decoding is taken from bitsandbytes' portable
backend (backends/default/ops.py: the formulas its CUDA kernel computes). bitsandbytes 0.50.2's AVX512 CPU kernel,
which dequantize_4bit dispatches to on this machine, decodes wrongly the blocks that do not start at a row
(e.g. W [64, 96] in blocks of 64: errors of 2.0 where the portable decoding's are 0.45); where blocks start at
rows both agree, which test_oracle_is_bitsandbytes_dequantize_4bit checks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mt.kernels.errors import KernelInputError
from tests.kernels.helpers import assert_close
from tests.kernels.test_cross_entropy import LargestTensor

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")

OUT, IN = 71, 99  # odd: a byte holds the last element of one row and the first of the next; blocks span rows


def bnb_dequantized(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """W as bitsandbytes' dequantize_4bit computes it, its 4-bit decoding the portable backend's."""
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    decode = default_ops._dequantize_4bit_compute.__wrapped__  # uncompiled
    code = bnb_functional.get_4bit_type(quant_state.quant_type, device=packed.device)
    return decode(packed.view(torch.uint8).reshape(-1), absmax.float(), code, quant_state.blocksize,
                  quant_state.shape, quant_state.dtype)


def quantized(out: int, inp: int, dtype: torch.dtype, seed: int, **options):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inp, generator=g) / inp ** 0.5).to(dtype)
    return bnb_functional.quantize_4bit(w, **options)


def decoded(kernels, packed, quant_state, transposed: bool) -> torch.Tensor:
    """W (or W^T) as the kernel decodes it: an identity times the 4-bit operand in float32 (one nonzero product
    per output, so the sum is exact)."""
    module = kernels.lora_linear
    w = module.kernel_weight((packed, quant_state))
    operand = w.t() if transposed else w
    identity = torch.eye(operand.shape[0], dtype=torch.float32)
    return module.fused_matmul(identity, operand)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,nested,dtype", [
    (32, False, torch.float32), (64, True, torch.bfloat16), (64, False, torch.float16), (128, True, torch.float32),
    (256, False, torch.bfloat16), (4096, True, torch.float16)])
def test_decoded_weight_equals_bitsandbytes_bit_for_bit(kernels, quant_type, blocksize, nested, dtype):
    """Both orientations the layer uses: W^T (forward, x W^T) and W (backward, dy W)."""
    packed, quant_state = quantized(OUT, IN, dtype, seed=blocksize, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=nested)
    assert quant_state.nested == nested
    expected = bnb_dequantized(packed, quant_state).float()
    assert torch.equal(decoded(kernels, packed, quant_state, transposed=False), expected)
    assert torch.equal(decoded(kernels, packed, quant_state, transposed=True), expected.t())


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage_dtypes_are_read_as_bytes(kernels, storage):
    """quantize_4bit(quant_storage=...) holds the same bytes in another dtype ([bytes / itemsize, 1])."""
    packed, quant_state = quantized(64, 96, torch.bfloat16, seed=3, quant_type="nf4", quant_storage=storage,
                                    compress_statistics=True)
    assert packed.dtype == storage
    expected = bnb_dequantized(packed, quant_state).float()
    assert torch.equal(decoded(kernels, packed, quant_state, transposed=True), expected.t())


def test_oracle_is_bitsandbytes_dequantize_4bit(kernels):
    """Where blocks start at rows, bitsandbytes' dequantize_4bit (the CPU kernel) equals the oracle above, and the
    kernel equals both."""
    for quant_type, nested in (("nf4", True), ("fp4", False)):
        packed, quant_state = quantized(40, 128, torch.bfloat16, seed=4, blocksize=64, quant_type=quant_type,
                                        compress_statistics=nested)
        public = bnb_functional.dequantize_4bit(packed, quant_state)
        assert torch.equal(public, bnb_dequantized(packed, quant_state))
        assert torch.equal(decoded(kernels, packed, quant_state, transposed=True), public.float().t())


def layer(rows: int, x_dtype: torch.dtype, adapter_dtype: torch.dtype, bias: bool, seed: int, rank: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN, generator=g).to(x_dtype)
    a = (torch.randn(rank, IN, generator=g) / IN ** 0.5).to(adapter_dtype)
    b = (torch.randn(OUT, rank, generator=g) / rank ** 0.5).to(adapter_dtype)
    bias_t = torch.randn(OUT, generator=g).to(x_dtype) if bias else None
    upstream = torch.randn(rows, OUT, generator=g)
    return x, a, b, bias_t, upstream


def outputs_and_grads(fn, x, w, a, b, bias, upstream, scaling):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    out = fn(x, w, a, b, scaling, bias=bias)
    (out.float() * upstream).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("quant_type,blocksize,nested,w_dtype,x_dtype,adapter_dtype,bias", [
    ("nf4", 64, True, torch.bfloat16, torch.bfloat16, torch.float32, True),  # transformers' QLoRA default
    ("nf4", 32, False, torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    ("fp4", 128, True, torch.float32, torch.float32, torch.float32, False),
    ("fp4", 64, False, torch.bfloat16, torch.float32, torch.float32, True),  # x f32 on a bf16-dequantizing weight
    ("nf4", 256, False, torch.float16, torch.float32, torch.float32, True),
])
def test_layer_matches_reference_on_bitsandbytes_weights(kernels, quant_type, blocksize, nested, w_dtype, x_dtype,
                                                         adapter_dtype, bias):
    """y, dx, dA, dB against the reference run in float32 on bitsandbytes' dequantized W (and the same x, A, B,
    bias values), its output rounded once to x's dtype, as test_lora_linear.py compares the dense base."""
    packed, quant_state = quantized(OUT, IN, w_dtype, seed=blocksize + nested, blocksize=blocksize,
                                    quant_type=quant_type, compress_statistics=nested)
    x, a, b, bias_t, upstream = layer(37, x_dtype, adapter_dtype, bias, seed=blocksize)
    fast = outputs_and_grads(kernels.lora_linear.lora_linear, x, (packed, quant_state), a, b, bias_t, upstream, 1.5)

    def reference(x, w, a, b, scaling, bias):
        out = kernels.lora_linear.lora_linear_reference(x.float(), w, a.float(), b.float(), scaling,
                                                        bias=None if bias is None else bias.float())
        return out.to(x.dtype)

    dense = bnb_dequantized(packed, quant_state).float()
    slow = outputs_and_grads(reference, x, dense, a, b, bias_t, upstream, 1.5)
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, slow):
        assert_close(got, expected, x_dtype, name, sums=True)


def test_no_tensor_of_the_dense_weight_size_is_made(kernels):
    """W [512, 384] NF4 (double quantized, bf16) under 4 tokens: forward and backward make no tensor of W's
    dense size; the largest any torch op returns is below one byte per weight (the packed bytes, 4 bits per
    weight, are seen as views). The reference (today's path before the kernel decoded W: bitsandbytes'
    dequantize_4bit, in the forward and again in the backward) makes W [512, 384] in bf16 and more."""
    out_features, in_features, rows = 512, 384, 4
    packed, quant_state = quantized(out_features, in_features, torch.bfloat16, seed=9, quant_type="nf4",
                                    compress_statistics=True)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(4, in_features, generator=g) * 0.05).requires_grad_()
    b = (torch.randn(out_features, 4, generator=g) * 0.05).requires_grad_()
    dense_bytes = out_features * in_features * 2
    with LargestTensor() as seen:
        kernels.lora_linear.lora_linear(x, (packed, quant_state), a, b, 2.0).float().sum().backward()
    assert seen.largest < out_features * in_features == dense_bytes // 2
    with LargestTensor() as seen_reference:
        kernels.lora_linear.lora_linear_reference(x, (packed, quant_state), a, b, 2.0).float().sum().backward()
    assert seen_reference.largest >= dense_bytes  # the probe does see a dense W when one is made


def _copy_with(quant_state, **changes):
    """A copy of quant_state with the attributes changed."""
    state = copy.copy(quant_state)
    for name, value in changes.items():
        setattr(state, name, value)
    return state


def _swap_quant_state(packed, quant_state, **changes):
    return packed, _copy_with(quant_state, **changes)


@pytest.mark.parametrize("case,message", [
    ("transposed_packed", "is not \\[bytes, 1\\]"),
    ("bytes_of_another_weight", "holds 2048 bytes but W 3960 values need 1980"),
    ("absmax_of_another_blocksize", "absmax holds 62 scales but W needs 124 blocks of 32"),
    ("quant_type", "quant type 'int4' is not one of"),
    ("dtype", "dequantizes to torch.int8, not a float dtype"),
    ("cpu_inference_layout", "CPU inference layout"),
    ("nested_state", "double-quantized absmax does not fit"),
    ("scales_on_another_device", "on cpu but its quant state's state2.absmax on meta"),
])
def test_unreadable_4bit_layouts_are_refused(kernels, case, message):
    packed, quant_state = quantized(40, 99, torch.bfloat16, seed=11, blocksize=64, quant_type="nf4",
                                    compress_statistics=True)
    weight = {
        "transposed_packed": lambda: (packed.t(), quant_state),
        "bytes_of_another_weight": lambda: (quantized(64, 64, torch.bfloat16, seed=1)[0], quant_state),
        "absmax_of_another_blocksize": lambda: _swap_quant_state(packed, quant_state, blocksize=32),
        "quant_type": lambda: _swap_quant_state(packed, quant_state, quant_type="int4"),
        "dtype": lambda: _swap_quant_state(packed, quant_state, dtype=torch.int8),
        "cpu_inference_layout": lambda: _swap_quant_state(packed, quant_state, packing_format_for_cpu=True),
        "nested_state": lambda: _swap_quant_state(packed, quant_state, absmax=quant_state.absmax.float()),
        "scales_on_another_device": lambda: _swap_quant_state(
            packed, quant_state, state2=_copy_with(quant_state.state2, absmax=quant_state.state2.absmax.to("meta"))),
    }[case]()
    x, a, b, _, _ = layer(3, torch.bfloat16, torch.float32, False, seed=12)
    with pytest.raises(KernelInputError, match=message):
        kernels.lora_linear.lora_linear(x, weight, a[:, :99], b[:40], 1.0)


# ---- compiled on a GPU (skipped without CUDA): bitsandbytes' CUDA kernels as the oracle -------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")


@needs_cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,nested,dtype", [(64, True, torch.bfloat16), (128, False, torch.float16),
                                                    (32, True, torch.float32)])
def test_cuda_decoded_weight_equals_bitsandbytes_cuda(device_kernels, quant_type, blocksize, nested, dtype):
    """The compiled decode (no fused multiply-add in the nested scale, hardware rounding to bf16/f16) against
    bitsandbytes' CUDA dequantize_4bit, bit for bit, W [70, 99]: bytes and blocks span rows."""
    module = device_kernels("lora_linear")
    g = torch.Generator().manual_seed(blocksize)
    w = (torch.randn(70, 99, generator=g) / 10).to(dtype).cuda()
    packed, quant_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                       compress_statistics=nested)
    expected = bnb_functional.dequantize_4bit(packed, quant_state).float()
    weight = module.kernel_weight((packed, quant_state))
    assert torch.equal(module.fused_matmul(torch.eye(70, device="cuda"), weight), expected)
    assert torch.equal(module.fused_matmul(torch.eye(99, device="cuda"), weight.t()), expected.t())


@needs_cuda
def test_cuda_layer_matches_reference_without_a_dense_weight(device_kernels):
    """W [4096, 2048] NF4 (double quantized, bf16), 16 tokens bf16, f32 adapter: y and the gradients equal the
    reference on bitsandbytes' dequantized W, and the CUDA memory peak of forward + backward stays under a
    quarter of the dense bf16 W (16 MiB), where the reference's exceeds it."""
    module = device_kernels("lora_linear")
    out_features, in_features, rows = 4096, 2048, 16
    g = torch.Generator().manual_seed(13)
    w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16).cuda()
    packed, quant_state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    del w
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16).cuda()
    a = (torch.randn(8, in_features, generator=g) / in_features ** 0.5).cuda()
    b = (torch.randn(out_features, 8, generator=g) / 8 ** 0.5).cuda()
    upstream = torch.randn(rows, out_features, generator=g).cuda()
    dense_bytes = out_features * in_features * 2

    def peak_and_result(fn, *args):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = outputs_and_grads(fn, *args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result

    outputs_and_grads(module.lora_linear, x, (packed, quant_state), a, b, None, upstream, 2.0)  # compiles, caches
    peak, fast = peak_and_result(module.lora_linear, x, (packed, quant_state), a, b, None, upstream, 2.0)
    reference_peak, _ = peak_and_result(module.lora_linear_reference, x, (packed, quant_state), a, b, None,
                                        upstream, 2.0)
    assert peak < dense_bytes // 4 and reference_peak >= dense_bytes

    def reference(x, w, a, b, scaling, bias):
        return module.lora_linear_reference(x.float(), w, a, b, scaling).to(x.dtype)

    dense = bnb_functional.dequantize_4bit(packed, quant_state).float()
    slow = outputs_and_grads(reference, x, dense, a, b, None, upstream, 2.0)
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, slow):
        assert_close(got, expected, torch.bfloat16, name, sums=True)
