"""Registry of visual-token reduction methods.

Adding a method is one file in `methods/` (a `Method` subclass decorated with `@register`) plus one
YAML in `conf/method/`. Modules in this package are imported on first lookup.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import re
import types
import typing
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
    # Shared checks, so that no method sees a NaN, an infinity, a string where a number is meant or a bool
    # where an integer is meant: non-finite values are refused first; then the method's own range checks
    # run (their messages name the range); a value of the wrong type that they let through, or trip over
    # (float("abc")), is refused against the field's type annotation.
    hints = typing.get_type_hints(cls)

    def type_error() -> MethodError | None:
        for pname, value in params.items():
            why = param_type_error(value, hints.get(pname, Any))
            if why:
                return MethodError(f"method.params.{pname}={show(value)}: {name}: {pname} {why}")
        return None

    for pname, value in params.items():
        if nonfinite(value):
            raise MethodError(f"method.params.{pname}={show(value)}: {name}: {pname} {param_type_error(value, Any)}")
    try:
        method = cls(**params)
    except TypeError as e:
        raise MethodError(f"method {name!r}: {e}") from None
    try:
        method.check_params()
    except MethodError as e:
        raise MethodError(keyed(name, params, str(e))) from None
    except Exception as e:  # the method's own check tripped over a value of the wrong type
        err = type_error()
        if err is not None:
            raise err from None
        raise MethodError(f"method {name!r}: invalid parameters ({type(e).__name__}: {e})") from None
    err = type_error()
    if err is not None:
        raise err
    return method


SEED_MAX = 2**32 - 1  # seeds are unsigned 32-bit (numpy's, lmms-eval's); the README's range [0, 2^32-1]


def check_seed(method_name: str, pname: str, value: Any) -> None:
    """A method's seed parameter: an integer in [0, 2^32-1] (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise MethodError(f"{method_name}: {pname} must be an integer in [0, {SEED_MAX}], got {value!r}")


def keyed(name: str, params: dict | None, message: str, prefix: str = "method.params.") -> str:
    """`message` (a method's one-line error) led by the parameter it is about, `<prefix><key>=<value>: `,
    like every other bad-input line. The key is the given parameter the message names first (after the
    method's name); messages already led by a key, or naming none of the parameters, stay as they are."""
    if message.startswith(("method.params.", "budget.")) or not params:
        return message
    body = message.split(": ", 1)[1] if message.startswith(f"{name}: ") else message
    # the parameter the message is about: one it writes as `key=...`, else the first one it names that is set
    # (a null parameter named in advice, "lower r / raise tokens", is not what was wrong), else the first named
    ranked, names = [], list(params)
    for i, pname in enumerate(names):
        m = re.search(rf"(?<![\w.]){re.escape(str(pname))}(?![\w\[])", body)
        if m:
            assigned = body[m.end():m.end() + 1] == "="
            ranked.append((not assigned, params[pname] is None, m.start(), i))
    if not ranked:
        return message
    key = names[min(ranked)[3]]
    return f"{prefix}{key}={show(params[key])}: {message}"


def label(name: str, params: dict | None = None) -> str:
    """A method's name as tables, figures and W&B run names show it: a composition is named by its
    members in order (`shortv+fastv`), every other method by its registry name."""
    if name == "compose":
        members = (params or {}).get("members") or []
        names = [m.get("name") for m in members if isinstance(m, dict) and isinstance(m.get("name"), str)]
        return "+".join(names) if names else name
    return name


def show(value: Any) -> str:
    """A value as the user would write it on the command line (`nan`, `abc`, `[1, 2]`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


def nonfinite(value: Any) -> bool:
    """True if `value` is, or contains (lists, dicts), a NaN or an infinity."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(nonfinite(v) for v in value)
    return False


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping", tuple: "a list"}


def param_type_error(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the type annotation `hint` of a method parameter (None if it does).

    Shared by every method, so no method sees a NaN, an infinity, a bool where a number is meant or a
    string where a number is meant: `int` takes integers (not booleans), `float` finite numbers,
    `bool` only true/false, `str` strings, `list[...]`/`dict[...]` containers (items checked), unions
    any of their members, `Any` anything finite."""
    if nonfinite(value):
        return "must be finite (NaN and infinity are not allowed)"
    ok = _fits(value, hint)
    if ok:
        return None
    return f"must be {_describe(hint)}"


def _members(hint: Any) -> tuple:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _describe(hint: Any) -> str:
    names = []
    for h in _members(hint):
        if h is type(None):
            continue
        base = typing.get_origin(h) or h
        args = typing.get_args(h)
        text = _NAMES.get(base, getattr(base, "__name__", str(base)))
        if base in (list, tuple) and args and args[0] is not Any:
            text = f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        names.append(text)
    if type(None) in _members(hint):
        names.append("null")
    return " or ".join(names)


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    for h in _members(hint):
        if h is type(None):
            if value is None:
                return True
            continue
        base = typing.get_origin(h) or h
        args = typing.get_args(h)
        if base is bool:
            if isinstance(value, bool):
                return True
        elif base is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif base is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif base is str:
            if isinstance(value, str):
                return True
        elif base in (list, tuple):
            if isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, (list, tuple)):
                return True
        elif base is dict:
            if isinstance(value, dict):
                return True
        elif isinstance(base, type) and isinstance(value, base):
            return True
    return False


__all__ = ["Method", "MethodError", "available", "build", "get", "label", "register"]
