"""Sweeps: Hydra multirun over cells, resumable and robust to a failing cell.

    vtbench -m method=none,fastv,tome benchmark=shapes
    vtbench -m hydra/launcher=submitit_local method=none,fastv      # parallel local processes
    vtbench -m hydra/launcher=submitit_slurm ...                     # a SLURM cluster

Each job is one cell (`harness.runner.run_cell`): a complete record is reused, a cell killed mid-way
resumes from its per-sample answers, a cell that fails at run time (e.g. out of memory) is recorded as
failed with its reason and the sweep goes on; a bad configuration stops the sweep before it starts.
"""
from __future__ import annotations

import itertools
import os
import sys
import traceback
from pathlib import Path

_STATE = {"total": None}


def _expand(overrides: list[str]) -> list[list[str]]:
    """All override combinations of a sweep (for validating every cell before anything runs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(c) for c in itertools.product(*axes)]


def _config_sweep_params(overrides: list[str]) -> list[str]:
    """`hydra.sweeper.params` of the composed config (e.g. set by an experiment) as `key=v1,v2` overrides,
    minus the keys given on the command line (which take precedence, as in Hydra's basic sweeper)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from harness.config import CONF_DIR

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    except Exception:  # a bad override: compose_config reports it in one line below
        return []
    finally:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
    params = cfg.hydra.sweeper.get("params") or {}
    given = {o.get_key_element() for o in parsed}
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def validate_sweep(overrides: list[str]) -> int:
    """Compose and validate every cell of the sweep (command-line sweeps and the config's
    `hydra.sweeper.params`, e.g. an experiment's table); raises the first bad-input error."""
    from harness.config import compose_config, validate

    cells = [o for o in overrides if not o.startswith(("hydra/", "hydra."))]
    combos = _expand(_config_sweep_params(cells) + cells)
    for combo in combos:
        validate(compose_config(combo))
    return len(combos)


def _default_group(cfg) -> None:
    """Cells of one sweep share a W&B group: the sweep's own folder name unless `logger.group` is set."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    logger = cfg.get("logger")
    if not logger or logger.get("name") != "wandb" or logger.get("group"):
        return
    try:
        sweep_dir = HydraConfig.get().sweep.dir
    except Exception:
        return
    with open_dict(cfg):
        cfg.logger.group = "sweep-" + "_".join(Path(sweep_dir).parts[-2:])


def _job(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from harness.cli import bad_input_errors, efficiency_fn, error_line, failure_reason, format_record
    from harness.runner import run_cell, write_failed

    try:
        num = HydraConfig.get().job.num + 1
    except Exception:
        num = "?"
    total = _STATE["total"] or os.environ.get("VTBENCH_SWEEP_TOTAL") or "?"
    _default_group(cfg)
    print(f"[vtbench] ===== cell {num}/{total} =====", file=sys.stderr, flush=True)
    try:
        rec = run_cell(cfg, efficiency_fn=efficiency_fn())
    except bad_input_errors() as e:
        print(f"vtbench: error in cell {num}: {error_line(e)}", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a run-time failure (OOM, kernel error): record it, go on
        reason = failure_reason(e)
        print(f"vtbench: cell {num} failed: {reason}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        write_failed(cfg, reason)
        return None
    print(format_record(rec), flush=True)
    return {"key": rec["key"], "accuracy": rec.get("accuracy")}


def run_multirun(overrides: list[str]) -> int:
    import hydra

    from harness.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, bad_input_errors, error_line
    from harness.config import CONF_DIR

    try:
        _STATE["total"] = validate_sweep(overrides)
    except bad_input_errors() as e:
        print(f"vtbench: error: {error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"[vtbench] sweep of {_STATE['total']} cells", file=sys.stderr, flush=True)
    os.environ["VTBENCH_SWEEP_TOTAL"] = str(_STATE["total"])  # for launchers that run cells in other processes

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _entry(cfg):
        return _job(cfg)

    argv = sys.argv
    sys.argv = ["vtbench", "--multirun", *overrides]
    try:
        _entry()
    except KeyboardInterrupt:
        print("vtbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # hydra exits on its own errors
        return int(e.code or 0)
    finally:
        sys.argv = argv
    return 0
