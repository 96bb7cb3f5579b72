"""Launched by torchrun in place of `-m mt` (tests/finetune/test_distributed.py): the mt CLI with
LlamaForCausalLM.forward, the only code that makes the [tokens, vocab] logits, raising when called: a run passes
only if every loss was the chunked cross-entropy (which runs the decoder and lm_head's weight itself)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaForCausalLM

from mt.cli import main


def full_logits_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("LlamaForCausalLM.forward ran: the full logits were made")


if __name__ == "__main__":
    LlamaForCausalLM.forward = full_logits_forward  # type: ignore[method-assign]
    main(prog_name="mt")
