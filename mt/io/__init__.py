"""Lazy readers for checkpoint files."""
