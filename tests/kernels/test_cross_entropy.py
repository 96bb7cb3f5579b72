"""Chunked cross-entropy: the Triton kernel (interpreted) and the torch chunk path against the full-logits
reference, loss and gradients for hidden and lm_head; and that no [tokens, vocab] tensor is ever made."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mt.kernels._triton import is_interpreted
from mt.kernels.cross_entropy import cross_entropy_reference
from mt.kernels.errors import KernelInputError
from tests.kernels.helpers import assert_close


def problem(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int, ignored: int = 3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 2 / hidden ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.randperm(tokens, generator=g)[:ignored]] = -100
    return h, w, labels


def loss_and_grads(fn, h, w, labels, **kwargs):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs)
    (loss * 1.5).backward()  # a grad_output other than 1
    return loss.detach(), h.grad, w.grad


def assert_matches_reference(fast, h, w, labels, dtype, **kwargs):
    """bf16: the reference in bf16 as transformers trains (bf16 logits, float32 loss, the logits' gradient rounded
    to bf16 before the matmuls), which the chunks do too."""
    slow = loss_and_grads(cross_entropy_reference, h, w, labels, reduction=kwargs.get("reduction", "mean"))
    assert_close(fast[0], slow[0], dtype, "loss")
    assert_close(fast[1], slow[1], dtype, "dhidden", sums=True)
    assert_close(fast[2], slow[2], dtype, "dlm_head", sums=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_vocab_and_tokens_not_multiples(kernels, dtype):
    """37 tokens in chunks of 16, vocab 5000 in blocks of 4096: the last chunk and the last block are partial."""
    h, w, labels = problem(37, 32, 5000, dtype, seed=1)
    fast = loss_and_grads(kernels.cross_entropy.chunked_cross_entropy, h, w, labels, chunk=16)
    assert_matches_reference(fast, h, w, labels, dtype)


def test_triton_sum_reduction_and_leading_dims(kernels):
    h, w, labels = problem(24, 16, 700, torch.float32, seed=2)
    fast = loss_and_grads(kernels.cross_entropy.chunked_cross_entropy, h.view(2, 12, 16), w, labels.view(2, 12),
                          chunk=5, reduction="sum")
    fast = (fast[0], fast[1].view(24, 16), fast[2])
    assert_matches_reference(fast, h, w, labels, torch.float32, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_chunk_path_matches_reference(device_kernels, dtype):
    module = device_kernels("cross_entropy")
    assert not is_interpreted(module._loss_and_grad_rows)
    h, w, labels = problem(37, 32, 1000, dtype, seed=3)
    fast = loss_and_grads(module.chunked_cross_entropy, h, w, labels, chunk=16)
    assert_matches_reference(fast, h, w, labels, dtype)


def test_frozen_lm_head_gets_no_gradient(kernels):
    h, w, labels = problem(10, 16, 300, torch.float32, seed=4)
    h = h.requires_grad_()
    kernels.cross_entropy.chunked_cross_entropy(h, w, labels, chunk=4).backward()
    reference_h = h.detach().clone().requires_grad_()
    cross_entropy_reference(reference_h, w, labels).backward()
    assert w.grad is None
    assert_close(h.grad, reference_h.grad, torch.float32, "dhidden", sums=True)


def test_all_ignored_is_nan_like_torch(kernels):
    h, w, labels = problem(6, 16, 100, torch.float32, seed=5, ignored=6)
    assert torch.isnan(kernels.cross_entropy.chunked_cross_entropy(h, w, labels, chunk=4))
    assert torch.isnan(cross_entropy_reference(h, w, labels))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any torch op returns while active: every allocation torch makes for
    the computation (Triton's interpreter works on the tensors it is handed, in numpy)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_no_tokens_by_vocab_tensor_is_made(kernels, device_kernels, path):
    """64 tokens x vocab 20000: full float32 logits would be 5.1 MB; chunks of 8 tokens keep every tensor made
    in forward and backward at most one chunk's float32 logits (8 x 20000 x 4 = 640 kB), 1/8 of that. (hidden 4,
    so that lm_head and its float32 gradient, 320 kB, stay below a chunk.)"""
    module = kernels.cross_entropy if path == "triton" else device_kernels("cross_entropy")
    tokens, vocab, chunk = 64, 20000, 8
    h, w, labels = problem(tokens, 4, vocab, torch.float32, seed=6)
    h, w = h.requires_grad_(), w.requires_grad_()
    with LargestTensor() as seen:
        loss = module.chunked_cross_entropy(h, w, labels, chunk=chunk)
        loss.backward()
    assert seen.largest <= chunk * vocab * 4 == tokens * vocab * 4 // 8
    with LargestTensor() as seen_reference:
        cross_entropy_reference(h, w, labels).backward()
    assert seen_reference.largest >= tokens * vocab * 4  # the probe does see a full logits tensor when one is made
    assert_close(loss.detach(), cross_entropy_reference(h, w, labels).detach(), torch.float32, "loss")


@pytest.mark.parametrize("case,message", [
    ("labels_shape", "do not fit"),
    ("label_out_of_vocab", "outside the vocabulary of 50"),
    ("reduction", "reduction 'none'"),
])
def test_bad_inputs_are_refused(kernels, case, message):
    h, w, labels = problem(8, 16, 50, torch.float32, seed=7)
    kwargs = {}
    if case == "labels_shape":
        labels = labels[:7]
    elif case == "label_out_of_vocab":
        labels[0] = 50
    else:
        kwargs["reduction"] = "none"
    with pytest.raises(KernelInputError, match=message):
        kernels.cross_entropy.chunked_cross_entropy(h, w, labels, **kwargs)
