"""Mistral: the Llama layout; llama.cpp's converter writes it as `llama`, which has no sliding-window attention
(`sliding_window` is not stored, and llama.cpp attends the full context)."""


from mt.io.gguf_out import GGUFContents
from mt.convert.arch.family import decoder_family
from mt.convert.arch.common import warn_if_window_ignored
from mt.convert.arch.llama import Llama


class Mistral(Llama):
    def write_hparams(self, w: GGUFContents, file_type: int) -> None:
        warn_if_window_ignored(self.config, self.config.get("sliding_window"), "Mistral")
        super().write_hparams(w, file_type)


FAMILY = decoder_family("Mistral", "mistral", qlora=True)
ARCH = Mistral
