"""Config composition and validation: fail fast, in one line, before anything heavy loads.

`compose_config(overrides)` composes `conf/config.yaml` with Hydra overrides and turns Hydra's
multi-line errors into one `ConfigError` line; `validate(cfg)` checks values and builds the method
(model-independent parameter ranges); `validate_against_model(cfg)` checks the method against the
model's architecture on the meta device (seconds, no weights).
"""
from __future__ import annotations

import math
import os
import re
import sys
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


#: keys under which `+key=value` may add new keys: Hydra's own config, the method parameters (the method
#: registry refuses names the method does not have, listing its parameters) and `model.arch` (a copy of
#: the checkpoint's config.json, checked by transformers' config class on the meta device). Everywhere
#: else vtbench's config is closed: `+run.typo=5` is refused like `run.typo=5`.
OPEN_KEYS = ("hydra.", "method.params.", "model.arch.")


def _added_key(ov: str) -> tuple[str, str] | None:
    """`(key, value)` of an override that adds a config key (`+key=v`, `++key=v`), None for group
    selections (`+experiment=x`, `hydra/launcher=...`) and for keys in OPEN_KEYS."""
    if not ov.startswith("+"):
        return None
    key, sep, value = ov.lstrip("+").partition("=")
    key = key.strip()
    if not sep or "/" in key or "." not in key and key in GROUPS + ("model_method",):
        return None
    if key.startswith(OPEN_KEYS) or key == "hydra":
        return None
    return key, value


def _one_line(e: Exception, overrides: list[str] | None = None) -> str:
    text = str(e).strip() + "\n" + str(e.__cause__ or "")
    bad_override = getattr(e, "override", None)
    if isinstance(bad_override, str) and bad_override:  # hydra's OverrideParseException
        first = text.strip().splitlines()[0]
        return f"{bad_override}: cannot parse this override ({first}; quote values with special characters)"
    m = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if m:  # a sweep (`key=a,b`) without -m: Hydra's hint in the one line
        return (f"{m.group(1)}: a comma list is a sweep: add -m (--multirun) to run one cell per value "
                f"(vtbench -m {m.group(1)}); for a list write key=[a,b], for a string quote it: key='a,b'")
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "not in struct" in text:
        key = m.group(1)
        value = next((o.partition("=")[2] for o in overrides or () if o.lstrip("+~").partition("=")[0] == key), None)
        head = f"{key}={value}: " if value is not None else ""
        return f"{head}unknown config key {key!r} (check the spelling; method parameters are listed in conf/method/)"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Set the environment variable", "full_key")):
            return line
    return type(e).__name__


def _refuse_added(overrides: list[str], added: list, config_name: str) -> None:
    """Refuse `+key=value` / `++key=value` overrides whose key the config does not have without them."""
    rest = [o for o in overrides if o not in {a for a, _ in added}]
    try:
        base = _hydra_compose(rest, config_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_one_line(e, overrides)) from None
    for _, (key, value) in added:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        if node is None or not OmegaConf.is_dict(node) or leaf not in node:
            raise ConfigError(
                f"{key}={value}: unknown config key {key!r} (`+` cannot add keys to vtbench's config; only under "
                f"{', '.join(k.rstrip('.') for k in OPEN_KEYS)}; check the spelling)"
            )


#: Hydra compositions of this process by (config name, overrides, conf/ files and their mtimes): a sweep
#: composes each cell for validation, progress and the final check; Hydra's compose is the costly part
_COMPOSED: dict[tuple, DictConfig] = {}


def _conf_stamp() -> tuple:
    """conf/'s YAML files with their sizes and mtimes: any edit or new file composes afresh."""
    out = []
    for p in sorted(CONF_DIR.rglob("*.yaml")):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _hydra_compose(overrides: list[str], config_name: str) -> DictConfig:
    import copy

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    key = (config_name, tuple(overrides), _conf_stamp())
    if key not in _COMPOSED:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=overrides)
        except Exception as e:  # hydra raises several exception types, all multi-line
            raise ConfigError(_one_line(e, overrides)) from None
        if len(_COMPOSED) > 4096:
            _COMPOSED.clear()
        _COMPOSED[key] = cfg
    # interpolations (${oc.env:...}) stay unresolved in the stored copy, so each caller resolves them now
    return copy.deepcopy(_COMPOSED[key])


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the root config with Hydra overrides (`key=value`); raise ConfigError."""
    overrides = list(overrides or [])
    _check_group_overrides(overrides)
    cfg = _hydra_compose(overrides, config_name)
    added = [(o, kv) for o in overrides if (kv := _added_key(o))]
    if added:  # `+` may not add keys to vtbench's own config (a typo would be silently ignored)
        _refuse_added(overrides, added, config_name)
    try:  # interpolations are resolved now, so a bad `${...}` is a config error, not a crash later
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        raise ConfigError(_one_line(e)) from None
    _check_budget_conflicts(cfg, overrides, config_name)
    return cfg


def _is_param_override(ov: str) -> bool:
    key = ov.lstrip("+~").partition("=")[0].strip()
    return key == "method.params" or key.startswith("method.params.")


def _check_budget_conflicts(cfg: DictConfig, overrides: list[str], config_name: str) -> None:
    """Refuse a method parameter set on the command line (to something other than its default:
    conf/method/<name>.yaml with conf/model_method/<model>_<method>.yaml) that the budget sets or clears:
    the budget would silently override it while the cell key keeps it (one cell under two keys)."""
    given = [o for o in overrides if _is_param_override(o)]
    budget = cfg.get("budget")
    if not given or budget is None or budget.get("kind") is None:
        return
    import methods
    from harness.budget import IGNORED, VARIES, budget_keys

    try:
        user = OmegaConf.to_container(cfg.method.params, resolve=True) if cfg.method.get("params") is not None else {}
        try:
            method = methods.build(cfg.method.name, user)
        except methods.MethodError:  # parameters bad on their own: what the budget sets is the method's
            if cfg.method.name == "compose":
                return
            method = methods.get(cfg.method.name)()
        keys = budget_keys(method, OmegaConf.to_container(budget, resolve=True))
    except Exception:  # bad parameters or budget: validate() names them
        return
    if not keys:
        return
    base = _hydra_compose([o for o in overrides if not _is_param_override(o)], config_name)
    unset = getattr(type(method), "budget_unset", {})
    if method.name == "compose":
        unset = {}
        for i, spec in enumerate(user.get("members") or []):
            for k, vals in getattr(methods.get(spec["name"]), "budget_unset", {}).items():
                unset[f"members.{i}.params.{k}"] = vals
    missing = object()
    for key, set_to in keys.items():
        value = OmegaConf.select(cfg, f"method.params.{key}", default=missing)
        default = OmegaConf.select(base, f"method.params.{key}", default=missing)
        if value is missing:
            continue
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        default = OmegaConf.to_container(default, resolve=True) if OmegaConf.is_config(default) else default
        if (value == default or value == _class_default(method, user, key)
                or (set_to not in (VARIES, IGNORED) and value == set_to) or value in unset.get(key, ())):
            continue
        what = "/".join(k.rpartition(".")[2] for k, v in keys.items() if v is not IGNORED)
        why = f"the budget sets {what}" + (f", which take precedence over {key.rpartition('.')[2]}: it would be unused"
                                           if set_to is IGNORED else "")
        raise _bad(f"method.params.{key}", value, f"conflicts with budget.kind={budget.kind} ({why}); drop one")


def _class_default(method, user: dict, key: str):
    """The method's own default of a parameter (`key` under method.params; a composition's
    `members.<i>.params.<k>`: that member method's default), or a sentinel when there is none."""
    import methods

    none = object()
    try:
        if key.startswith("members."):
            _, i, _, k = key.split(".", 3)
            return methods.get(user["members"][int(i)]["name"])().params().get(k, none)
        return methods.get(method.name)().params().get(key, none)
    except Exception:  # no defaults to compare with
        return none


# ---- value checks ---------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    from methods import show

    return show(value)


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={_show(value)}: {why}")


_SEED_MAX = 2**32 - 1  # numpy's and lmms-eval's seeds are unsigned 32-bit


def _int(cfg, key: str, *, lo: int | None = None, hi: int | None = None, null: bool = False) -> None:
    """`key` (dotted, under `cfg`) is an integer in [lo, hi] (not a bool, not a float), or null if allowed."""
    value = OmegaConf.select(cfg, key)
    if value is None and null:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        if lo == 1 and hi is None:
            what = "a positive integer"
        elif lo == 0 and hi is None:
            what = "a non-negative integer"
        elif lo is not None and hi is not None:
            what = f"an integer in [{lo}, {hi}]"
        else:
            what = "an integer"
        raise _bad(key, value, f"{key} must be {what}{' or null' if null else ''}")


def _number(cfg, key: str, *, lo: float | None = None, null: bool = False) -> None:
    """`key` is a finite number >= lo (NaN and infinities refused), or null if allowed."""
    value = OmegaConf.select(cfg, key)
    if value is None and null:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (lo is not None and value < lo):
        rng = "" if lo is None else f" >= {lo:g}"
        raise _bad(key, value, f"{key} must be a finite number{rng}{' or null' if null else ''}")


def _bool(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise _bad(key, value, f"{key} must be true or false")


def _str(cfg, key: str, *, null: bool = False, choices=None, required: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and null and not required:
        return
    if choices is not None and value not in choices:
        opts = ", ".join(str(c) for c in choices)
        raise _bad(key, value, f"{key} must be one of {opts}{' or null' if null else ''}")
    if not isinstance(value, str) or (required and not value):
        if required and value in (None, ""):
            raise ConfigError(f"{key} is required")
        raise _bad(key, value, f"{key} must be a string{' or null' if null else ''}")


def device_error(device: str) -> str | None:
    """Why `device` cannot be used on this machine (None if it can): asking for a GPU that is not there
    is bad input, found before anything loads rather than after the data are prepared."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (no GPU, or torch without CUDA)"
        n = torch.cuda.device_count()
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        if idx >= n:
            return f"this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "MPS (Apple GPU) is not available on this machine"
    return None


def check_outputs() -> None:
    """`$VTBENCH_OUTPUTS` (where Hydra's run and sweep folders go: `hydra.run.dir`, `hydra.sweep.dir`) can
    hold folders: a file in its place, or an unwritable parent, is bad input naming the variable, before
    anything runs (`vtbench` and `vtbench -m`)."""
    value = os.environ.get("VTBENCH_OUTPUTS")
    if value is None:
        return
    from harness.paths import dir_problem

    problem = "empty value" if not value.strip() else dir_problem(os.path.expanduser(value))
    if problem:
        raise ConfigError(f"VTBENCH_OUTPUTS={value}: {problem} (Hydra's run and sweep folders are written there)")


def validate(cfg: DictConfig, *, check_device: bool = True):
    """Value checks that need no model (type, range and finiteness of every key of run, budget,
    calibration, benchmark, model, logger, and of the method parameters); returns the built `Method`.

    `check_device`: also check that `run.device` exists on this machine (off only where the cells run
    on other machines, e.g. a SLURM launcher's login node)."""
    import methods
    from harness.models.loading import DTYPES

    # run
    _int(cfg, "run.limit", lo=1, null=True)
    _int(cfg, "run.batch_size", lo=1)
    _int(cfg, "run.seed", lo=0, hi=_SEED_MAX)
    device = cfg.run.device
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise _bad("run.device", device, "run.device must be cpu, cuda, cuda:N, mps or auto")
    if check_device:
        why = device_error(device)
        if why:
            raise _bad("run.device", device, why)
    _str(cfg, "run.dtype", null=True, choices=sorted(DTYPES))
    _bool(cfg, "run.force")
    _int(cfg, "run.max_new_tokens", lo=1, null=True)
    workers = OmegaConf.select(cfg, "run.workers")
    if workers != "auto" and not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        # how a sweep runs (harness.workers), never part of a cell's key
        raise _bad("run.workers", workers, "run.workers must be a positive integer or auto")
    _int(cfg, "run.threads", lo=1, null=True)
    _bool(cfg, "run.efficiency.enabled")
    _int(cfg, "run.efficiency.probe_size", lo=1)
    _int(cfg, "run.efficiency.flops_docs", lo=1, null=True)
    _int(cfg, "run.efficiency.warmup", lo=0)
    _int(cfg, "run.efficiency.repeats", lo=1)
    _int(cfg, "run.efficiency.decode_tokens", lo=1)
    _str(cfg, "store.dir", required=True)
    _str(cfg, "data_dir", required=True)

    # model
    model = cfg.model
    for key in ("name", "family", "pretrained"):
        if not model.get(key):
            raise ConfigError(f"model.{key} is required")
        _str(cfg, f"model.{key}", required=True)
    from harness.models.adapter import FAMILIES

    if model.family not in FAMILIES:
        raise ConfigError(f"model.family {model.family!r} is not supported ({', '.join(FAMILIES)})")
    _str(cfg, "model.revision", null=True)
    _str(cfg, "model.dtype", choices=sorted(DTYPES))
    _str(cfg, "model.attn_implementation", choices=ATTN_IMPLS)
    if not isinstance(model.get("trust_remote_code", False), bool):
        raise _bad("model.trust_remote_code", model.get("trust_remote_code"), "model.trust_remote_code must be true or false")
    arch = model.get("arch")
    if arch is not None:
        if not isinstance(arch, DictConfig):
            raise _bad("model.arch", arch, "model.arch must be a mapping (the checkpoint's config.json) or null")
        from methods import nonfinite

        if nonfinite(OmegaConf.to_container(arch, resolve=True)):
            raise _bad("model.arch", "...", "model.arch has a NaN or infinite value")
    template = model.get("chat_template")
    if template is not None:
        _str(cfg, "model.chat_template")
        from harness.models.checkpoint import chat_template_error

        why = chat_template_error(template)
        if why:
            short = template if len(template) <= 40 else template[:37] + "..."
            raise _bad("model.chat_template", short, f"the chat template {why}")

    # benchmark
    bench = cfg.benchmark
    if not bench.get("task"):
        raise ConfigError("benchmark.task is required")
    for key in ("name", "task", "metric"):
        _str(cfg, f"benchmark.{key}", required=True)
    metrics = bench.get("metrics")
    if metrics is not None and (not OmegaConf.is_list(metrics) or not all(isinstance(m, str) for m in metrics)):
        raise _bad("benchmark.metrics", metrics, "benchmark.metrics must be a list of metric names")
    if "builtin" in bench:
        _bool(cfg, "benchmark.builtin")
    if "higher_is_better" in bench:
        _bool(cfg, "benchmark.higher_is_better")
    _str(cfg, "benchmark.include_path", null=True)
    if bench.get("builtin"):
        if bench.get("split") not in ("val", "test"):
            raise _bad("benchmark.split", bench.get("split"), "benchmark.split must be val or test")
        if "seed" in bench:
            _int(cfg, "benchmark.seed", lo=0, hi=_SEED_MAX)
    elif "split" in bench:
        _str(cfg, "benchmark.split", null=True)

    # calibration
    if cfg.get("calibration") is not None:
        _str(cfg, "calibration.benchmark", choices=group_options("benchmark"))
        _str(cfg, "calibration.split", choices=("val", "test"))
        _int(cfg, "calibration.n", lo=1)
        _int(cfg, "calibration.seed", lo=0, hi=_SEED_MAX)
        _int(cfg, "calibration.batch_size", lo=1)
        _int(cfg, "calibration.tail", lo=0)
        _number(cfg, "calibration.alpha", lo=0)
        _str(cfg, "calibration.dir", required=True)

    # logger
    logger = cfg.logger
    _str(cfg, "logger.name", choices=group_options("logger"))
    if logger.name == "wandb":
        _str(cfg, "logger.mode", choices=("offline", "online", "disabled"))
        _str(cfg, "logger.project", required=True)
        _str(cfg, "logger.entity", null=True)
        _str(cfg, "logger.dir", required=True)
        _str(cfg, "logger.group", null=True)
        _bool(cfg, "logger.log_samples")
        if (os.environ.get("WANDB_MODE") or logger.mode) != "disabled":  # the W&B folder, before any model loads
            from harness.paths import dir_problem

            problem = dir_problem(os.path.expanduser(str(logger.dir)))
            if problem:
                raise ConfigError(f"logger.dir={logger.dir}: {problem}")

    # budget
    from harness.budget import BudgetError, check

    budget = OmegaConf.to_container(cfg.budget, resolve=True) if cfg.get("budget") is not None else None
    if budget is not None:
        _str(cfg, "budget.kind", null=True, choices=("tokens", "flops"))
        _number(cfg, "budget.value", null=True)
        _int(cfg, "budget.text_tokens", lo=1)
        if budget.get("kind") is None and budget.get("value") is not None:
            raise _bad("budget.value", budget["value"], "a budget value needs budget.kind=tokens or budget.kind=flops")
    try:
        check(budget)
    except BudgetError as e:
        raise ConfigError(str(e)) from None
    if budget and budget.get("kind") is not None and cfg.method.name == "none":
        raise ConfigError("method none has no budget (it is the reference): drop budget.kind")

    params = cfg.method.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    try:
        method = methods.build(cfg.method.name, params)
        method.check_run(OmegaConf.to_container(cfg.run, resolve=True))
        return method
    except methods.MethodError as e:
        raise ConfigError(str(e)) from None
    except (TypeError, ValueError, ArithmeticError) as e:  # a method's own check tripping on an odd value
        raise ConfigError(f"method {cfg.method.name!r}: invalid parameters ({type(e).__name__}: {e})") from None


def _model_cache_key(model_cfg) -> str:
    import json

    return json.dumps(OmegaConf.to_container(model_cfg, resolve=True), sort_keys=True, default=str)


def validate_against_model(cfg: DictConfig, method, *, cache: dict | None = None) -> tuple[Any, Any, dict]:
    """Check the method against the model architecture (meta device, no weights) and apply the
    budget; returns `(method, meta adapter, budget info)`. Raises ConfigError (bad method/model
    combination, impossible budget) or ModelLoadError. `cache` (a dict kept by the caller, e.g. a
    sweep's validation) reuses one meta adapter per model config."""
    from harness.budget import BudgetError, resolve
    from harness.models.adapter import NotApplicable
    from harness.models.loading import meta_adapter
    from methods import MethodError

    budget = OmegaConf.to_container(cfg.budget, resolve=True) if cfg.get("budget") is not None else None
    try:
        if cache is None:
            adapter = meta_adapter(cfg.model)
        else:
            key = _model_cache_key(cfg.model)
            if key not in cache:
                cache[key] = meta_adapter(cfg.model)
            adapter = cache[key]
        if cfg.model.get("family") and cfg.model.family != adapter.family:  # the model says what it is
            raise ConfigError(f"model.family={cfg.model.family}: the model's architecture is a {adapter.family} "
                              f"model (set model.family={adapter.family})")
        method.validate(adapter)
        method, info = resolve(method, adapter, budget)
        _warn_percent_like(budget, info)
        check_calibration(cfg, method)
    except BudgetError as e:  # name the budget that cannot be met
        msg = str(e)
        if budget and not msg.startswith("budget."):
            msg = f"budget.kind={budget.get('kind')} budget.value={_show(budget.get('value'))}: {msg}"
        raise ConfigError(msg) from None
    except MethodError as e:  # name the parameter, like validate()'s errors
        import methods as registry

        msg = str(e)
        if msg.startswith(f"{method.name}: "):
            params = cfg.method.get("params")
            params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
            msg = registry.keyed(method.name, params, msg)
        raise ConfigError(msg) from None
    except NotApplicable as e:
        raise ConfigError(str(e)) from None
    return method, adapter, info


_WARNED: set = set()


def _warn_percent_like(budget: dict | None, info: dict) -> None:
    """One stderr line per process and message for a token count that reads like a percent (harness.budget)."""
    from harness.budget import percent_like_warning

    n = (info.get("layout") or {}).get("visual")
    line = percent_like_warning(budget, int(n)) if n else None
    if line and line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr)


def needs_calibration(method) -> bool:
    """Whether `method` takes layers from a calibration computed on first use (`auto` without an artefact)."""
    if method.name == "compose":
        return any(needs_calibration(m) for m in method._build_members())
    p = method.params()
    if method.name == "shortv":
        return p.get("layers") == "auto" and not p.get("calibration")
    if method.name == "redundancylens":
        return (p.get("hollow_layers") == "auto" and not p.get("calibration_hollow")) or (
            p.get("ffn_layers") == "auto" and not p.get("calibration_ffn")
        )
    return False


def check_calibration(cfg: DictConfig, method) -> None:
    """For a cell that takes layers from a calibration computed on first use (`layers=auto` without an
    artefact path): `calibration.dir` can hold the artefact (a directory, or creatable, and writable)
    and `calibration.n` fits the calibration split when its size is known without loading data (the
    built-in benchmarks). Found here, before the model loads, not when the artefact is written."""
    if cfg.get("calibration") is None or not needs_calibration(method):
        return
    cal = cfg.calibration
    from harness.paths import dir_problem

    d = Path(str(cal.dir)).expanduser()
    problem = dir_problem(str(d))
    # an unwritable folder that already holds artefacts may still serve the cached one
    if problem and not (d.is_dir() and any(d.glob("*.json"))):
        raise _bad("calibration.dir", cal.dir, f"{problem} (the calibration artefacts are written there)")
    bench = OmegaConf.load(CONF_DIR / "benchmark" / f"{cal.benchmark}.yaml")
    if bench.get("builtin") and bench.get("name") == "shapes":
        from harness.benchmarks.shapes import SPLIT_SIZES

        size = SPLIT_SIZES.get(str(cal.split))
        if size is not None and int(cal.n) > size:
            raise _bad("calibration.n", cal.n, f"the calibration split {cal.benchmark}:{cal.split} has only {size} samples")


def resolved(cfg: DictConfig) -> dict:
    """The fully resolved config as plain containers (Hydra's own node excluded)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return c
