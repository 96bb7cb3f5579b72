"""mt verify: a GGUF against its source folder (metadata, vocabulary, tokens, logits, chat template)."""
