"""`none`: the unmodified model, the reference every method is compared against."""
from __future__ import annotations

import dataclasses

from methods import register
from methods.base import LLM_SIDE_FAMILIES, Method


@register
@dataclasses.dataclass
class NoReduction(Method):
    name = "none"
    families = LLM_SIDE_FAMILIES
    noop = {}
    example = None

    def apply(self, model, adapter):
        return model
