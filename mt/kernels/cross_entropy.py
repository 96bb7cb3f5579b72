"""Cross-entropy of a language-model head, chunked over tokens: never a [tokens, vocab] float32 logits tensor.

    loss = mean over tokens with label != ignore_index of  logsumexp(z) - z[label],   z = h W^T
    or, with softcap c (Gemma 2/3's final_logit_softcapping), of the same on  s = c * tanh(z / c)

hidden [..., H], lm_head weight W [V, H], labels [...] (already shifted: the label of each position is the token
it predicts). The reference builds the full logits in float32, as transformers' loss does.

The chunked version takes `chunk` tokens at a time: their logits [chunk, V] in hidden's dtype (one matmul), then a
Triton kernel per row computes logsumexp in float32 over vocab blocks of BLOCK_V (online max and sum), the row's
loss, and overwrites the logits in place with their gradient softmax - onehot (zero for ignored rows); with a
softcap, softmax(s) - onehot times ds/dz = 1 - tanh(z / c)^2, recomputed from the raw logits it overwrites. The chunk's
gradients dh = dlogits W and dW += dlogits^T h are formed right away, so the forward returns with the loss and both
gradients computed and the backward only scales them by grad_output / n_valid. The only full-vocab buffer is
the chunk's logits (plus, without Triton, a float32 copy of that chunk). dW, when W needs a gradient, is
accumulated in float32 ([V, H] float32), from float32 copies of each chunk's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mt.kernels._triton import jit, next_power_of_2, tl, triton_runs
from mt.kernels.errors import KernelInputError

MAX_BLOCK_V = 4096
DEFAULT_CHUNK = 1024  # tokens: Llama-3's 128256-entry vocab makes that 256 MiB of bf16 logits per chunk
REDUCTIONS = ("mean", "sum")


def cross_entropy_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100, reduction: str = "mean",
                            softcap: float | None = None) -> torch.Tensor:
    logits = (hidden @ lm_head_weight.t()).float()
    if softcap:  # in float32 as the kernels (transformers' Gemma2ForCausalLM softcaps in the logits' dtype)
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


@jit
def _tanh(u):
    """tanh from exp (Triton has no tanh builtin): exp(-2|u|) never overflows; absolute error ~1e-7 near 0."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@jit
def _loss_and_grad_rows(logits_ptr, labels_ptr, loss_ptr, row_stride, ignore_index, softcap, V: tl.constexpr,
                        SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss[row] = logsumexp(s) - s[label] (0 if ignored), s = the logits z, or softcap * tanh(z / softcap)
    with SOFTCAP; with WRITE_GRAD, the row's logits are overwritten with d loss / d z: softmax(s) - onehot(label),
    times 1 - tanh(z / softcap)^2 with SOFTCAP (zeros if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row).to(tl.int32)
    ignored = label == ignore_index
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(mask, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.reduce(x, 0, tl.standard._elementwise_max))
        running_sum = running_sum * tl.exp(running_max - new_max) + \
            tl.reduce(tl.exp(x - new_max), 0, tl.standard._sum_combine)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(row_ptr + tl.where(ignored, 0, label)).to(tl.float32)
    if SOFTCAP:
        target = softcap * _tanh(target / softcap)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - target))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            onehot = tl.where(start + cols == label, 1.0, 0.0)
            if SOFTCAP:
                t = _tanh(x / softcap)
                grad = (tl.exp(softcap * t - lse) - onehot) * (1.0 - t * t)
            else:
                grad = tl.exp(x - lse) - onehot
            grad = tl.where(ignored, 0.0, grad)
            tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float,
                  write_grad: bool) -> torch.Tensor:
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block_v = min(MAX_BLOCK_V, next_power_of_2(vocab))
    _loss_and_grad_rows[(rows,)](logits, labels, losses, logits.stride(0), ignore_index, softcap, V=vocab,
                                 SOFTCAP=softcap > 0, WRITE_GRAD=write_grad, BLOCK_V=block_v,
                                 num_warps=8 if block_v >= 2048 else 4)
    return losses


def _chunk_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float,
                 write_grad: bool) -> torch.Tensor:
    """What the kernel does, in torch (float32 copies of the chunk's logits)."""
    as_float = logits.float()
    tanh = torch.tanh(as_float / softcap) if softcap > 0 else None
    scores = tanh * softcap if tanh is not None else as_float
    lse = torch.logsumexp(scores, dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)[:, None]
    losses = torch.where(valid, lse - scores.gather(1, safe_labels)[:, 0], 0.0)
    if write_grad:
        grad = scores.sub_(lse[:, None]).exp_()
        grad.scatter_add_(1, safe_labels, torch.full_like(lse[:, None], -1.0))
        if tanh is not None:
            grad.mul_(1.0 - tanh.square_())
        logits.copy_(grad.mul_(valid[:, None]))
    return losses


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int,
                reduction: str, softcap: float, use_triton: bool) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_step = _chunk_triton if use_triton else _chunk_torch
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            logits = h @ weight.t()  # [chunk, V], the one full-vocab buffer
            loss_sum += chunk_step(logits, labels[start:start + chunk], ignore_index, softcap,
                                   need_hidden or need_weight).sum()
            if need_hidden:
                torch.mm(logits, weight, out=grad_hidden[start:start + chunk])
            if need_weight:
                grad_weight.addmm_(logits.t().float(), h.float())
            del logits
        n_valid = (labels != ignore_index).sum().to(torch.float32)
        divisor = n_valid if reduction == "mean" else torch.ones_like(n_valid)
        ctx.save_for_backward(grad_hidden, grad_weight, divisor)
        return loss_sum / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, divisor = ctx.saved_tensors
        scale = grad_loss / divisor
        dh = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        dw = grad_weight * scale if grad_weight is not None else None
        return dh, dw, None, None, None, None, None, None


def _check(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int,
           reduction: str, softcap: float | None = None) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != labels.shape:
        raise KernelInputError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)}, lm_head {tuple(weight.shape)} "
                               f"and labels {tuple(labels.shape)} do not fit (hidden [..., H], lm_head [V, H], "
                               "labels [...])")
    if chunk < 1 or reduction not in REDUCTIONS:
        raise KernelInputError(f"chunked_cross_entropy: chunk {chunk} must be >= 1 and reduction {reduction!r} one of "
                               f"{REDUCTIONS}")
    if softcap is not None and not softcap > 0:
        raise KernelInputError(f"chunked_cross_entropy: softcap {softcap} must be > 0 (or None for no softcapping)")
    counted = labels[labels != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= weight.shape[0]):
        raise KernelInputError(f"chunked_cross_entropy: a label lies outside the vocabulary of {weight.shape[0]} "
                               f"(and is not ignore_index {ignore_index})")


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = DEFAULT_CHUNK, ignore_index: int = -100, reduction: str = "mean",
                          softcap: float | None = None) -> torch.Tensor:
    """The mean (or sum) cross-entropy of hidden @ lm_head_weight^T (softcapped to softcap * tanh(. / softcap)
    when softcap is given) against labels, a float32 scalar, with gradients for hidden and lm_head_weight. Triton
    on CUDA (or interpreted), the same chunking in torch otherwise. As torch's cross_entropy, a mean over no counted
    token is NaN."""
    _check(hidden, lm_head_weight, labels, chunk, ignore_index, reduction, softcap)
    rows = hidden.reshape(-1, hidden.shape[-1])
    use_triton = triton_runs(_loss_and_grad_rows, hidden, lm_head_weight)
    return ChunkedCrossEntropyFunction.apply(rows, lm_head_weight, labels.reshape(-1), int(chunk), int(ignore_index),
                                             reduction, float(softcap or 0.0), use_triton)
