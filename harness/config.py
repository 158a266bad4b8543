"""Config composition and validation: fail fast, in one line, before anything heavy loads.

`compose_config(overrides)` composes `conf/config.yaml` with Hydra overrides and turns Hydra's
multi-line errors into one `ConfigError` line; `validate(cfg)` checks values and builds the method
(model-independent parameter ranges); `validate_against_model(cfg)` checks the method against the
model's architecture on the meta device (seconds, no weights).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "benchmark", "logger", "experiment")
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps|auto)$")


class ConfigError(ValueError):
    """Invalid configuration; the message is one line."""


def group_options(group: str) -> list[str]:
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _check_group_overrides(overrides: list[str]) -> None:
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        for choice in value.split(","):  # sweeps: a,b,c
            choice = choice.strip()
            if choice in ("", "null"):
                continue
            opts = group_options(key)
            if choice not in opts:
                raise ConfigError(f"unknown {key} {choice!r} (available: {', '.join(opts)})")


def _one_line(e: Exception) -> str:
    text = str(e).strip() + "\n" + str(e.__cause__ or "")
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in text:
        return f"unknown config key {m.group(1)!r} (check the spelling; method parameters are listed in conf/method/)"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Set the environment variable", "full_key")):
            return line
    return type(e).__name__


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the root config with Hydra overrides (`key=value`); raise ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    _check_group_overrides(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # hydra raises several exception types, all multi-line
        raise ConfigError(_one_line(e)) from None
    try:  # interpolations are resolved now, so a bad `${...}` is a config error, not a crash later
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise ConfigError(_one_line(e)) from None
    return cfg


def _positive_int_or_null(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")


def validate(cfg: DictConfig):
    """Value checks that need no model; returns the built `Method`."""
    import methods
    from harness.models.loading import DTYPES

    run = cfg.run
    _positive_int_or_null(run.limit, "run.limit")
    if isinstance(run.batch_size, bool) or not isinstance(run.batch_size, int) or run.batch_size < 1:
        raise ConfigError(f"run.batch_size must be a positive integer, got {run.batch_size!r}")
    if isinstance(run.seed, bool) or not isinstance(run.seed, int):
        raise ConfigError(f"run.seed must be an integer, got {run.seed!r}")
    if not isinstance(run.device, str) or not DEVICE_RE.match(run.device):
        raise ConfigError(f"run.device must be cpu, cuda or cuda:N, got {run.device!r}")
    if run.dtype is not None and run.dtype not in DTYPES:
        raise ConfigError(f"run.dtype must be one of {', '.join(sorted(DTYPES))} or null, got {run.dtype!r}")
    _positive_int_or_null(run.max_new_tokens, "run.max_new_tokens")
    eff = run.efficiency
    _positive_int_or_null(eff.probe_size, "run.efficiency.probe_size")
    _positive_int_or_null(eff.repeats, "run.efficiency.repeats")
    _positive_int_or_null(eff.decode_tokens, "run.efficiency.decode_tokens")

    model = cfg.model
    for key in ("name", "family", "pretrained"):
        if not model.get(key):
            raise ConfigError(f"model.{key} is required")
    if model.family not in ("llava", "llava_next"):
        raise ConfigError(f"model.family {model.family!r} is not supported (llava, llava_next)")
    if model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(sorted(DTYPES))}, got {model.dtype!r}")
    if model.attn_implementation not in ATTN_IMPLS:
        raise ConfigError(
            f"model.attn_implementation must be one of {', '.join(ATTN_IMPLS)}, got {model.attn_implementation!r}"
        )
    if not isinstance(model.get("trust_remote_code", False), bool):
        raise ConfigError("model.trust_remote_code must be true or false")

    bench = cfg.benchmark
    if not bench.get("task"):
        raise ConfigError("benchmark.task is required")
    if bench.get("builtin") and bench.get("split") not in ("val", "test"):
        raise ConfigError(f"benchmark.split must be val or test, got {bench.get('split')!r}")

    logger = cfg.logger
    if logger.name == "wandb" and logger.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode must be offline, online or disabled, got {logger.mode!r}")

    from harness.budget import BudgetError, check

    budget = OmegaConf.to_container(cfg.budget, resolve=True) if cfg.get("budget") is not None else None
    try:
        check(budget)
    except BudgetError as e:
        raise ConfigError(str(e)) from None
    if budget and budget.get("kind") is not None and cfg.method.name == "none":
        raise ConfigError("method none has no budget (it is the reference): drop budget.kind")

    params = cfg.method.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    try:
        return methods.build(cfg.method.name, params)
    except methods.MethodError as e:
        raise ConfigError(str(e)) from None


def validate_against_model(cfg: DictConfig, method) -> tuple[Any, Any, dict]:
    """Check the method against the model architecture (meta device, no weights) and apply the
    budget; returns `(method, meta adapter, budget info)`. Raises ConfigError (bad method/model
    combination, impossible budget) or ModelLoadError."""
    from harness.budget import BudgetError, resolve
    from harness.models.adapter import NotApplicable
    from harness.models.loading import meta_adapter
    from methods import MethodError

    budget = OmegaConf.to_container(cfg.budget, resolve=True) if cfg.get("budget") is not None else None
    try:
        adapter = meta_adapter(cfg.model)
        method.validate(adapter)
        method, info = resolve(method, adapter, budget)
    except (MethodError, NotApplicable, BudgetError) as e:
        raise ConfigError(str(e)) from None
    return method, adapter, info


def resolved(cfg: DictConfig) -> dict:
    """The fully resolved config as plain containers (Hydra's own node excluded)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return c
