"""Launched by torchrun in place of `-m mt` (tests/finetune/test_fsdp.py): the mt CLI, with the model's forward
raising on its Nth call in each process (N from MT_TEST_DIE_AT_FORWARD), as a run killed mid-way stops: whatever
--save-every wrote before stays, the output folder never appears."""

from __future__ import annotations

import os
from typing import Any

from transformers import LlamaForCausalLM

from mt.cli import main

_forward = LlamaForCausalLM.forward
_calls = [0]


def dying_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    _calls[0] += 1
    if _calls[0] == int(os.environ["MT_TEST_DIE_AT_FORWARD"]):
        raise RuntimeError("killed")
    return _forward(self, *args, **kwargs)


if __name__ == "__main__":
    LlamaForCausalLM.forward = dying_forward  # type: ignore[method-assign]
    main(prog_name="mt")
