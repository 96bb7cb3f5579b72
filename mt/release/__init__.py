"""mt release: one read of a checkpoint (and adapter) to a folder of GGUF files, one per type."""
