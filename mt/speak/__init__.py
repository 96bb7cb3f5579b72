"""Speech from mt's TADA files: llama.cpp runs the backbone, mt the acoustic head and the codec decoder."""
