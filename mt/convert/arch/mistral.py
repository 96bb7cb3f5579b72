"""Mistral: the Llama layout; llama.cpp writes it as `llama` (sliding window is not stored)."""

from mt.convert.arch.llama import Llama


class Mistral(Llama):
    pass


ARCH = Mistral
