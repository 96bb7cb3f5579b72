"""SmolLM2-135M-Instruct for the tests: mt's own builder (mt/smollm2.py), cached under the tests' cache root."""

from __future__ import annotations

from mt.smollm2 import smollm2_dir

__all__ = ["smollm2_dir"]
