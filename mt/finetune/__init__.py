"""Planned: see the issues."""
