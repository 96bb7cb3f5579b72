"""Hugging Face checkpoint -> GGUF."""
