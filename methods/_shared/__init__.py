"""Machinery shared by several methods (visual-token bookkeeping, reduced layers, merging)."""
