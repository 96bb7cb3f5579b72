"""mt: Hugging Face checkpoints to GGUF, byte-identical to llama.cpp's tools."""

__version__ = "0.1.0"
