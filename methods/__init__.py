"""Registry of visual-token reduction methods.

Adding a method is one file in `methods/` (a `Method` subclass decorated with `@register`) plus one
YAML in `conf/method/`. Modules in this package are imported on first lookup.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from methods.base import Method, MethodError

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False
_INTERNAL = {"base"}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _INTERNAL and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a method from its name and parameters, with model-independent checks."""
    cls = get(name)
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise MethodError(
            f"method {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(sorted(fields)) or '(none)'}"
        )
    try:
        method = cls(**params)
    except TypeError as e:
        raise MethodError(f"method {name!r}: {e}") from None
    method.check_params()
    return method


__all__ = ["Method", "MethodError", "available", "build", "get", "register"]
