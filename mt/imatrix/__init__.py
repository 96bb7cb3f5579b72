"""mt imatrix: importance matrices computed by running the Hugging Face model over calibration text, as
llama-imatrix computes them from a GGUF."""
