"""GGML tensor types: numpy references and fast paths that produce the same bytes."""
