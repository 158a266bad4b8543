"""Model loading and family adapters."""
from harness.models.adapter import ModelAdapter, NotApplicable, get_adapter

__all__ = ["ModelAdapter", "NotApplicable", "get_adapter"]
