"""Logits from both sides, one at a time, and their divergence.

llama.cpp runs the GGUF (llama-cpp-python); transformers runs the source in float32. Each side is
freed before the other loads, so only one copy of the model is in memory.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mt.errors import AdapterError
from mt.io.quiet import native_stderr_silenced

LOGIT_BATCH = 32  # tokens per llama_decode: llama.cpp's output and compute buffers scale with it times the vocabulary


def llama_cpp_logits(gguf_path: Path, ids: list[int], n_ctx: int = 512, lora: Path | None = None) -> np.ndarray:
    """[len(ids), n_vocab] float32 logits of the GGUF in llama.cpp (with a GGUF LoRA adapter applied, scale 1).

    Decodes LOGIT_BATCH tokens at a time into one result array instead of llama-cpp-python's logits_all buffer
    (n_ctx rows), through its batch and context objects (llama-cpp-python 0.3.36's `_batch`, `_ctx`). The file is
    read, not mapped: llama.cpp's CPU backend repacks quantized weights into buffers of its own, and mapped pages
    would stay resident beside them (same kernels either way)."""
    from llama_cpp import Llama

    with native_stderr_silenced():
        llm = Llama(model_path=str(gguf_path), n_ctx=max(n_ctx, len(ids) + 8), n_batch=LOGIT_BATCH, n_ubatch=LOGIT_BATCH,
                    verbose=False, n_threads=2, use_mmap=False,
                    lora_path=str(lora) if lora is not None else None)
    try:
        n_vocab = llm.n_vocab()
        out = np.empty((len(ids), n_vocab), dtype=np.float32)
        with native_stderr_silenced():
            for start in range(0, len(ids), LOGIT_BATCH):
                chunk = ids[start:start + LOGIT_BATCH]
                llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                llm._ctx.decode(llm._batch)
                out[start:start + len(chunk)] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), n_vocab))
        return out
    finally:
        llm.close()
        del llm
        gc.collect()


def hf_logits(folder: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    """[len(ids), vocab] float32 logits of the checkpoint in transformers, in float32 (+ a PEFT adapter, merged)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    if adapter is not None:
        model = _with_adapter(model, folder, Path(adapter))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0]
        return out.float().numpy()
    finally:
        del model
        gc.collect()


def _with_adapter(model: Any, folder: Path, adapter: Path) -> Any:
    """peft's merge of `adapter` into `model`; an adapter peft cannot place on this base (its target modules are not
    there, e.g. q_proj on Phi-3's fused qkv_proj, which mt merges into the fused rows) is a typed error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except ValueError as e:  # peft's NoMatchingPeftModuleError and shape errors are ValueErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"peft cannot apply the adapter {adapter.name} to {folder.name} ({reason})",
                           "verify against the merged model: mt merge BASE ADAPTER -o DIR, then mt verify OUT.gguf --reference DIR") from None


@dataclass
class LogitStats:
    kld_mean: float
    kld_max: float
    top1_agreement: float
    max_abs_diff: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> LogitStats:
    """KL(reference || candidate) per position, top-1 agreement and max |Δlogit| over a shared vocab."""
    n_vocab = min(reference.shape[-1], candidate.shape[-1])
    ref, cand = reference[:, :n_vocab], candidate[:, :n_vocab]
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    return LogitStats(float(kld.mean()), float(kld.max()), top1, float(np.abs(ref - cand).max()))
