"""LoRA linear: the fused Triton matmul (interpreted) against the reference, dense bf16/f32 and NF4 base weights.

bf16 cases compare against the reference computed in float32 on the same bf16 values (weights, inputs, NF4's
dequantized weight) and rounded once at the end, within 1e-2 of each element plus 1e-2 of the result's RMS
(helpers.assert_close, sums=True). peft's own bf16 arithmetic rounds the base output, the update and their sum
separately, which alone moves some outputs by 2 ulp.
"""

from __future__ import annotations

import pytest
import torch

from mt.kernels._triton import is_interpreted
from mt.kernels.errors import KernelInputError
from mt.kernels.lora_linear import lora_linear_reference
from tests.kernels.helpers import assert_close

ROWS, IN, OUT, RANK = 150, 100, 200, 8  # rows, in and out features not multiples of any tile (64/128)


def layer(dtype: torch.dtype, adapter_dtype: torch.dtype, seed: int, rows: int = ROWS, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN, generator=g).to(dtype)
    w = (torch.randn(OUT, IN, generator=g) / IN ** 0.5).to(dtype)
    a = (torch.randn(RANK, IN, generator=g) / IN ** 0.5).to(adapter_dtype)
    b = (torch.randn(OUT, RANK, generator=g) / RANK ** 0.5).to(adapter_dtype)
    bias_t = torch.randn(OUT, generator=g).to(dtype) if bias else None
    upstream = torch.randn(rows, OUT, generator=g)
    return x, w, a, b, bias_t, upstream


def run(fn, x, w, a, b, upstream, **kwargs):
    """fn's output and the gradients for x, A and B of sum(out * upstream)."""
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    out = fn(x, w, a, b, **kwargs)
    (out.float() * upstream).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


def run_reference(x, w, a, b, upstream, bias=None, **kwargs):
    """The reference in float32 on x's values (its dtype's), the output rounded once to x's dtype."""
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    bias32 = None if bias is None else bias.float()
    out = lora_linear_reference(x.float(), w.float(), a.float(), b.float(), bias=bias32, **kwargs).to(x.dtype)
    (out.float() * upstream).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


def assert_same(fast, slow, dtype):
    for name, got, expected in zip(("y", "dx", "dA", "dB"), fast, slow):
        assert_close(got, expected, dtype, name, sums=True)


@pytest.mark.parametrize("dtype,adapter_dtype,bias", [
    (torch.float32, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.bfloat16, torch.float32, False),  # QLoRA's usual mix: bf16 activations, f32 adapter
])
def test_dense_base_matches_reference(kernels, dtype, adapter_dtype, bias):
    x, w, a, b, bias_t, upstream = layer(dtype, adapter_dtype, seed=1, bias=bias)
    fast = run(kernels.lora_linear.lora_linear, x, w, a, b, upstream, scaling=2.0, bias=bias_t)
    slow = run_reference(x, w, a, b, upstream, scaling=2.0, bias=bias_t)
    assert_same(fast, slow, dtype)


def test_leading_dims_and_rank_not_a_power_of_two(kernels):
    x, w, a, b, _, upstream = layer(torch.float32, torch.float32, seed=2)
    a, b = a[:5].contiguous(), b[:, :5].contiguous()  # rank 5
    x3, up3 = x[:120].view(4, 30, IN), upstream[:120].view(4, 30, OUT)
    fast = run(kernels.lora_linear.lora_linear, x3, w, a, b, up3, scaling=0.5)
    slow = run_reference(x3, w, a, b, up3, scaling=0.5)
    assert_same(fast, slow, torch.float32)


def test_dropout_on_the_adapter_input_matches_reference_with_the_same_mask(kernels):
    x, w, a, b, _, upstream = layer(torch.float32, torch.float32, seed=3)
    torch.manual_seed(11)
    fast = run(kernels.lora_linear.lora_linear, x, w, a, b, upstream, scaling=1.0, dropout=0.3)
    torch.manual_seed(11)
    slow = run_reference(x, w, a, b, upstream, scaling=1.0, dropout=0.3)
    assert_same(fast, slow, torch.float32)
    without = run_reference(x, w, a, b, upstream, scaling=1.0)
    assert not torch.allclose(without[2], slow[2])  # the mask did act on dA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_matches_reference_on_the_bitsandbytes_dequantized_weight(kernels, dtype):
    """W quantized to NF4 by bitsandbytes and decoded in the kernel; the reference gets bitsandbytes' dequantized W
    as a dense tensor (more 4-bit cases: test_lora_linear_4bit.py)."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x, w, a, b, _, upstream = layer(dtype, dtype, seed=4)
    packed, quant_state = bnb_functional.quantize_4bit(w, quant_type="nf4")
    dequantized = bnb_functional.dequantize_4bit(packed, quant_state)
    assert dequantized.dtype == dtype and not torch.equal(dequantized, w)  # NF4 moved the weights
    fast = run(kernels.lora_linear.lora_linear, x, (packed, quant_state), a, b, upstream, scaling=2.0)
    slow = run_reference(x, dequantized, a, b, upstream, scaling=2.0)
    assert_same(fast, slow, dtype)


def test_params4bit_weight_as_a_quantized_model_holds_it(kernels):
    bnb = pytest.importorskip("bitsandbytes")
    x, w, a, b, _, upstream = layer(torch.bfloat16, torch.bfloat16, seed=5, rows=20)
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
    assert param.quant_state is not None and param.dtype == torch.uint8
    dequantized = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    fast = run(kernels.lora_linear.lora_linear, x, param, a, b, upstream[:20], scaling=1.0)
    slow = run_reference(x, dequantized, a, b, upstream[:20], scaling=1.0)
    assert_same(fast, slow, torch.bfloat16)


def test_cpu_without_interpreter_is_the_reference(device_kernels):
    module = device_kernels("lora_linear")  # decorated for a real device: CPU tensors take the reference
    assert not is_interpreted(module._matmul_lowrank)
    lora_linear = module.lora_linear

    x, w, a, b, _, _ = layer(torch.float32, torch.float32, seed=6, rows=3)
    assert torch.equal(lora_linear(x, w, a, b, 2.0), lora_linear_reference(x, w, a, b, 2.0))


def test_bad_shapes_and_a_trainable_base_are_refused(kernels):
    x, w, a, b, _, _ = layer(torch.float32, torch.float32, seed=7, rows=4)
    with pytest.raises(KernelInputError, match="do not fit"):
        kernels.lora_linear.lora_linear(x, w, a, b[:, :4], 1.0)
    with pytest.raises(KernelInputError, match="do not fit"):
        kernels.lora_linear.lora_linear(x[:, :50], w, a, b, 1.0)
    with pytest.raises(KernelInputError, match="base weight requires grad"):
        kernels.lora_linear.lora_linear(x, w.requires_grad_(), a, b, 1.0)


def test_more_row_tiles_than_a_group(kernels, monkeypatch):
    """16 x 32 tiles: 10 row tiles walk the 7 column tiles in groups of GROUP_M=8 and a remainder of 2."""
    monkeypatch.setitem(kernels.lora_linear.TILES, torch.float32, (16, 32, 32, 4, 3))
    x, w, a, b, bias_t, upstream = layer(torch.float32, torch.float32, seed=8, bias=True)
    fast = run(kernels.lora_linear.lora_linear, x, w, a, b, upstream, scaling=1.0, bias=bias_t)
    slow = run_reference(x, w, a, b, upstream, scaling=1.0, bias=bias_t)
    assert_same(fast, slow, torch.float32)
