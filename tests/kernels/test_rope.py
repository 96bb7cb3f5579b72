"""RoPE in place: the Triton kernel (interpreted) against the reference, and the reference against transformers."""

from __future__ import annotations

import pytest
import torch

from mt.kernels._triton import is_interpreted
from mt.kernels.errors import KernelInputError
from mt.kernels.rope import rope_reference
from tests.kernels.helpers import assert_close


def cos_sin_table(max_positions: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[max_positions, head_dim] tables, as transformers' default rotary embedding builds them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def qk(batch: int, q_heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_heads, seq, head_dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(dtype))


def rotated_and_grads(apply, q0: torch.Tensor, k0: torch.Tensor, seed: int):
    """apply(q, k) on copies of q0/k0 (in place for the kernel), then d(sum(q·uq + k·uk))/d(q0, k0)."""
    g = torch.Generator().manual_seed(seed)
    uq, uk = torch.randn(q0.shape, generator=g), torch.randn(k0.shape, generator=g)
    q_leaf, k_leaf = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    q, k = apply(q_leaf * 1, k_leaf * 1)  # non-leaf copies: in-place on a leaf that needs grad is an error
    ((q.float() * uq).sum() + (k.float() * uk).sum()).backward()
    return q.detach(), k.detach(), q_leaf.grad, k_leaf.grad


def assert_same_rotation(fast, slow, dtype):
    for name, a, b in zip(("q", "k", "dq", "dk"), fast, slow):
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_position_embeddings_form_matches_reference(kernels, dtype, head_dim):
    """cos/sin as transformers passes them to attention: [batch, seq, d] (here batch 2, seq 7, GQA 4/2 heads)."""
    q0, k0 = qk(2, 4, 2, 7, head_dim, dtype, seed=head_dim)
    cos_t, sin_t = cos_sin_table(32, head_dim)
    position_ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6]])
    cos, sin = cos_t[position_ids].to(dtype), sin_t[position_ids].to(dtype)
    fast = rotated_and_grads(lambda q, k: kernels.rope.apply_rope_(q, k, cos, sin), q0, k0, seed=1)
    slow = rotated_and_grads(lambda q, k: rope_reference(q, k, cos, sin), q0, k0, seed=1)
    assert_same_rotation(fast, slow, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequences_position_ids_restart(kernels, dtype):
    """Three samples packed in one row (positions restart at 0), tables indexed by position_ids."""
    q0, k0 = qk(1, 3, 1, 9, 64, dtype, seed=7)
    cos, sin = (t.to(dtype) for t in cos_sin_table(16, 64))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])
    fast = rotated_and_grads(lambda q, k: kernels.rope.apply_rope_(q, k, cos, sin, position_ids), q0, k0, seed=2)
    slow = rotated_and_grads(lambda q, k: rope_reference(q, k, cos, sin, position_ids), q0, k0, seed=2)
    assert_same_rotation(fast, slow, dtype)
    # a packed sample's tokens rotate as the same tokens alone at positions 0.. would
    alone = rope_reference(q0[:, :, 4:6], k0[:, :, 4:6], cos, sin, torch.tensor([[0, 1]]))
    assert_close(fast[0][:, :, 4:6], alone[0], dtype, "second packed sample")


def test_rotates_a_transposed_view_in_place(kernels):
    """q as attention sees it: a [batch, heads, seq, d] view of the projection's [batch, seq, heads, d] output."""
    proj_q = torch.randn(2, 5, 4, 64)
    proj_k = torch.randn(2, 5, 2, 64)
    cos_t, sin_t = cos_sin_table(8, 64)
    position_ids = torch.arange(5)[None, :]
    expected_q, expected_k = rope_reference(proj_q.transpose(1, 2), proj_k.transpose(1, 2), cos_t, sin_t, position_ids)
    q, k = kernels.rope.apply_rope_(proj_q.transpose(1, 2), proj_k.transpose(1, 2), cos_t, sin_t, position_ids)
    assert q.data_ptr() == proj_q.data_ptr() and k.data_ptr() == proj_k.data_ptr()
    assert_close(proj_q.transpose(1, 2), expected_q, torch.float32, "q in place")
    assert_close(proj_k.transpose(1, 2), expected_k, torch.float32, "k in place")


def test_gradients_through_a_transposed_view_of_a_projection(kernels):
    """As in attention during training: q, k are transposed views of projection outputs that need grad (autograd
    refuses an in-place Function on a view that returns two tensors)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    w_q, w_k = torch.randn(4 * 16, 32, generator=g), torch.randn(2 * 16, 32, generator=g)
    cos_t, sin_t = cos_sin_table(8, 16)
    cos, sin = cos_t[None, :5], sin_t[None, :5]
    upstream_q, upstream_k = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)

    def rotated_grad(apply):
        x.grad = None
        q = (x @ w_q.t()).view(2, 5, 4, 16).transpose(1, 2)
        k = (x @ w_k.t()).view(2, 5, 2, 16).transpose(1, 2)
        q, k = apply(q, k, cos, sin)
        ((q * upstream_q).sum() + (k * upstream_k).sum()).backward()
        return q.detach(), k.detach(), x.grad.clone()

    fast, slow = rotated_grad(kernels.rope.apply_rope_), rotated_grad(rope_reference)
    for name, a, b in zip(("q", "k", "dx"), fast, slow):
        assert_close(a, b, torch.float32, name)


def test_reference_equals_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = qk(2, 4, 2, 6, 64, torch.float32, seed=3)
    cos_t, sin_t = cos_sin_table(16, 64)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])
    ours = rope_reference(q, k, cos_t, sin_t, position_ids)
    theirs = apply_rotary_pos_emb(q, k, cos_t[position_ids], sin_t[position_ids])
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_cpu_without_interpreter_takes_the_reference_path_in_place(device_kernels):
    module = device_kernels("rope")  # decorated for a real device: CPU tensors take the reference
    assert not is_interpreted(module._rope_rotate)
    apply_rope_ = module.apply_rope_

    q, k = qk(1, 2, 1, 3, 64, torch.float32, seed=4)
    cos_t, sin_t = cos_sin_table(4, 64)
    position_ids = torch.tensor([[0, 1, 2]])
    expected = rope_reference(q, k, cos_t, sin_t, position_ids)
    q_in, k_in = q.clone(), k.clone()
    apply_rope_(q_in, k_in, cos_t, sin_t, position_ids)
    assert torch.equal(q_in, expected[0]) and torch.equal(k_in, expected[1])


@pytest.mark.parametrize("case,message", [
    ("position_out_of_table", "outside the cos/sin table of 4 positions"),
    ("odd_head_dim", "even head_dim"),
    ("cos_wrong_seq", "must be \\[batch or 1, 3, 64\\]"),
])
def test_bad_inputs_are_refused(kernels, case, message):
    q, k = qk(1, 2, 1, 3, 64, torch.float32, seed=5)
    cos_t, sin_t = cos_sin_table(4, 64)
    if case == "position_out_of_table":
        args = (q, k, cos_t, sin_t, torch.tensor([[0, 1, 4]]))
    elif case == "odd_head_dim":
        args = (q[..., :63], k[..., :63], cos_t[:, :63], sin_t[:, :63], torch.tensor([[0, 1, 2]]))
    else:
        args = (q, k, cos_t[None, :2], sin_t[None, :2], None)
    with pytest.raises(KernelInputError, match=message):
        kernels.rope.apply_rope_(*args)


def test_position_embeddings_shared_across_the_batch(kernels):
    """cos/sin [1, seq, d] (transformers with position_ids [1, seq]) broadcast over a batch of 3."""
    q0, k0 = qk(3, 2, 2, 5, 64, torch.float32, seed=8)
    cos_t, sin_t = cos_sin_table(8, 64)
    cos, sin = cos_t[None, 2:7], sin_t[None, 2:7]
    fast = rotated_and_grads(lambda q, k: kernels.rope.apply_rope_(q, k, cos, sin), q0, k0, seed=3)
    slow = rotated_and_grads(lambda q, k: rope_reference(q, k, cos, sin), q0, k0, seed=3)
    assert_same_rotation(fast, slow, torch.float32)
