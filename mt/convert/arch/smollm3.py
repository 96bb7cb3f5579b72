"""SmolLM3: the Llama layout in which every 4th layer attends without rope (`no_rope_layers`).

llama.cpp hard-codes that pattern and the converter writes none, so a config with another one is refused rather
than converted to a file that computes another model.
"""

from __future__ import annotations

from typing import Any

from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import DECODER_LINEAR, Family
from mt.convert.arch.common import warn_if_window_ignored
from mt.convert.arch.llama import Llama
from mt.errors import UnsupportedArchitecture

LLAMA_CPP_NO_ROPE_STEP = 4  # llama.cpp: layer il uses rope unless (il + 1) % 4 == 0


def no_rope_layers(config: dict[str, Any], n_layer: int) -> list[int]:
    """1 where a layer applies rope, as transformers reads the config (the list, else every `interval`-th off)."""
    if (given := config.get("no_rope_layers")) is not None:
        return [int(x) for x in given]
    interval = int(config.get("no_rope_layer_interval") or LLAMA_CPP_NO_ROPE_STEP)
    return [int((i + 1) % interval != 0) for i in range(n_layer)]


def require_llama_cpp_rope_layers(config: dict[str, Any], n_layer: int) -> None:
    expected = [int((i + 1) % LLAMA_CPP_NO_ROPE_STEP != 0) for i in range(n_layer)]
    if (given := no_rope_layers(config, n_layer)) != expected:
        raise UnsupportedArchitecture(
            f"config.json's rope layers (no_rope_layers {given}) differ from llama.cpp's SmolLM3 layout, where every "
            f"{LLAMA_CPP_NO_ROPE_STEP}th layer skips rope ({expected})",
            "llama.cpp cannot run this layout; the checkpoint needs a llama.cpp that reads the rope layers",
        )


class SmolLM3(Llama):
    gguf_arch = "smollm3"

    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        require_llama_cpp_rope_layers(self.config, self.block_count())
        window = self.config.get("sliding_window") if self.config.get("use_sliding_window") else None
        warn_if_window_ignored(self.config, window, "SmolLM3")
        super().write_hparams(w, file_type)


FAMILY = Family(DECODER_LINEAR)  # merged and converted; mt's training kernels would put rope on its no-rope layers
ARCH = SmolLM3
