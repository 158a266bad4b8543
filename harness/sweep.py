"""Sweeps: Hydra multirun over cells, resumable and robust to a failing cell.

    vtbench -m method=none,fastv,tome benchmark=shapes
    vtbench -m hydra/launcher=submitit_local method=none,fastv      # parallel local processes
    vtbench -m hydra/launcher=submitit_slurm ...                     # a SLURM cluster

Each job is one cell (`harness.runner.run_cell`): a complete record is reused, a cell killed mid-way
resumes from its per-sample answers, a cell that fails at run time (e.g. out of memory, or every sample
failing) is recorded as failed with its reason and the sweep goes on.

Several sweeps in one command: `vtbench -m <sweep> --next <sweep> --next ...` validates every cell of every
sweep first, then runs them as one sweep (one pool of workers, no wait between the sweeps, one fork server):
the cells of the next sweep go to workers while the last ones of the previous sweep still run. Each sweep
has its own overrides (nothing carries over a `--next`) and its own Hydra folder (`<sweep dir>/<n>/`); cells
are numbered across them. `make eval` runs its three grids this way.

Exit status: every cell of the sweep (the command line's sweeps and the config's `hydra.sweeper.params`)
is validated before the first one runs, with the same checks as a single `vtbench` including the
method against the model's architecture on the meta device (one meta model per model config): bad
input anywhere ends in one line and exit 2 with nothing run. After the sweep, the store says how each
cell ended (whatever the launcher, local or SLURM): if any cell is not complete the last line names
them (`key=value` overrides) and the exit code is 1; 0 means every cell is complete. Ctrl-C exits 130,
SIGTERM 143, in one line; rerunning the same command resumes.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

_STATE: dict = {"total": None, "reasons": {}, "pool": None}
#: each cell of the running sweep composed once (by validate_sweep): overrides -> (config, record key); the
#: plan, the progress monitor and the final check read them instead of composing again
_CELLS: dict[tuple, tuple] = {}


def _env_key() -> tuple:
    """The `VTBENCH_*` environment, part of every composition's cache key (the config reads it)."""
    return tuple(sorted((n, v) for n, v in os.environ.items() if n.startswith("VTBENCH_")))


def _cell(combo: list[str]):
    """The composed config and record key of a cell of the sweep (composed on first use)."""
    from harness.config import compose_config, resolved
    from harness.results import record_key

    k = (tuple(combo), _env_key())
    if k not in _CELLS:
        cfg = compose_config(combo)
        _CELLS[k] = (cfg, record_key(resolved(cfg)))
    return _CELLS[k]


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


#: `_compose_hydra` results of the running command by overrides (each sweep asks three times)
_HYDRA_NODES: dict[tuple, object] = {}


def _compose_hydra(overrides: list[str]):
    """The composed config with Hydra's own node (sweeper params, launcher), or None if it does not compose
    (compose_config reports the error in one line). Kept for the running command (`run_multirun`)."""
    key = (tuple(overrides), _env_key())
    if key not in _HYDRA_NODES:
        _HYDRA_NODES[key] = _compose_hydra_now(overrides)
    return _HYDRA_NODES[key]


def _compose_hydra_now(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import CONF_DIR

    try:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception:
        return None
    finally:
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()


def _config_sweep_params(overrides: list[str]) -> list[str]:
    """`hydra.sweeper.params` of the composed config (e.g. set by an experiment) as `key=v1,v2` overrides,
    minus the keys given on the command line (which take precedence, as in Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a bad override: compose_config reports it in one line below
        return []
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = _compose_hydra(fixed)
    if cfg is None:
        return []
    params = cfg.hydra.sweeper.get("params") or {}
    given = {o.get_key_element() for o in parsed}
    return [f"{k}={v}" for k, v in params.items() if k not in given]


def _cells_run_elsewhere(overrides: list[str]) -> bool:
    """True if the launcher runs cells on other machines (SLURM): this machine's devices say nothing
    about theirs, so `run.device` is checked by each job instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return False
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = _compose_hydra(fixed)
    target = str(cfg.hydra.launcher.get("_target_", "")) if cfg is not None else ""
    return "slurm" in target.lower()


def validate_sweep(overrides: list[str], adapters: dict | None = None) -> list[list[str]]:
    """Compose and validate every cell of the sweep (command-line sweeps and the config's
    `hydra.sweeper.params`, e.g. an experiment's table) with the full single-cell checks, the meta-device
    check against the model included (one meta model per model config); raises the first bad-input
    error. Returns the cells (their overrides)."""
    from harness.config import compose_config, validate, validate_against_model

    from harness.config import check_outputs

    check_outputs()  # the sweep folder's parent ($VTBENCH_OUTPUTS)
    cells = [o for o in overrides if not o.startswith(("hydra/", "hydra."))]
    try:
        combos = _expand(_config_sweep_params(cells) + cells)
    except Exception:  # an override Hydra cannot parse: compose_config names it in one line
        compose_config(cells)
        raise
    elsewhere = _cells_run_elsewhere(overrides)
    adapters = {} if adapters is None else adapters  # meta models by model config (shared by a command's sweeps)
    from harness.errors import bad_input_errors

    cfgs = []
    try:
        for combo in combos:
            cfg = compose_config(combo)
            method = validate(cfg, check_device=not elsewhere)
            validate_against_model(cfg, method, cache=adapters)
            cfgs.append(cfg)
            _cell(combo)  # composed once more, untouched by the checks: the sweep's copy of the cell
    except bad_input_errors() as e:  # name the cell: the same override may be fine in one cell, not in another
        if not _sweep_wide(e, combo, combos, elsewhere, adapters):
            e.sweep_cell = cell_label(combo, combos)
        raise
    if not elsewhere:  # under SLURM each job checks its checkpoint on its own node
        check_every_checkpoint(cfgs)
    return combos


def _sweep_wide(e: BaseException, combo: list[str], combos: list[list[str]], elsewhere: bool, adapters: dict) -> bool:
    """True if a bad-input error found in the sweep's first cell is not about that cell (`logger.dir`, a value
    every cell shares): the next cell fails with the same line. The line then names no cell; an error that
    only some cells have is led by the cell (`[method=tome] ...`)."""
    from harness.config import compose_config, validate, validate_against_model
    from harness.errors import bad_input_errors, error_line

    if combo is not combos[0] or len(combos) < 2:
        return False
    try:
        cfg = compose_config(combos[1])
        validate_against_model(cfg, validate(cfg, check_device=not elsewhere), cache=adapters)
    except bad_input_errors() as other:
        return error_line(other) == error_line(e)
    return False


def check_every_checkpoint(cfgs) -> None:
    """Check every distinct checkpoint of the sweep before the first cell (`harness.models.checkpoint`:
    missing, incomplete or inconsistent files, tokenizer/processor against the config, chat template,
    generation config): one bad checkpoint is bad input and no cell runs. Each checkpoint (pretrained,
    revision, chat template) is checked once."""
    from harness.models.checkpoint import check_available

    seen: set = set()
    for cfg in cfgs:
        key = tuple(str(cfg.model.get(k)) for k in ("pretrained", "revision", "trust_remote_code", "chat_template"))
        if key not in seen:
            seen.add(key)
            check_available(cfg.model)


def cell_label(combo: list[str], combos: list[list[str]]) -> str:
    """The overrides that tell `combo` from the sweep's other cells (`method=tome budget.value=0.33`): those
    whose key takes more than one value over the sweep; '' for a sweep of one cell."""
    def key(o: str) -> str:
        return o.partition("=")[0].lstrip("+~")

    values: dict = {}
    for c in combos:
        for o in c:
            values.setdefault(key(o), set()).add(o.partition("=")[2])
    return " ".join(o for o in combo if len(values.get(key(o), ())) > 1)


def sweep_error_line(e: BaseException) -> str:
    """The one line of a sweep's bad-input error, led by the cell it was found in (`[method=tome] ...`)."""
    from harness.errors import error_line

    cell = getattr(e, "sweep_cell", "")
    where = " ".join(x for x in (getattr(e, "sweep_index", ""), cell) if x)
    return f"[{where}] {error_line(e)}" if where else error_line(e)


def cell_outcomes(combos: list[list[str]]) -> list[tuple[list[str], str]]:
    """`(overrides, reason)` of every cell of the sweep that has no complete record in its store."""
    from harness.results import ResultsStore

    bad = []
    for combo in combos:
        cfg, key = _cell(combo)
        rec = ResultsStore(cfg.store.dir).get(key)
        if rec is None:
            why = _STATE["reasons"].get(frozenset(combo)) or _STATE["reasons"].get(key)  # by key: a worker's cell
            bad.append((combo, why or "no record (the job did not finish)"))
        elif rec.get("status") != "complete":
            bad.append((combo, str(rec.get("error") or rec.get("status"))))
    return bad


def _monitor(combos: list[list[str]], labels: list[str] | None = None):
    """The progress/result lines and the final table of the sweep (`harness.sweep_monitor`)."""
    from harness.results import ResultsStore
    from harness.sweep_monitor import SweepMonitor

    cells = []
    for i, combo in enumerate(combos):
        cfg, key = _cell(combo)
        label = labels[i] if labels is not None else _sweep_overrides(combo, combos)
        cells.append((label, ResultsStore(cfg.store.dir).record_path(key), key))
    return SweepMonitor(cells)


#: separates the sweeps of one command (`vtbench -m <sweep> --next <sweep>`)
NEXT = "--next"


def split_sweeps(argv: list[str]) -> list[list[str]]:
    """The sweeps of a command line, split at `--next`; raises ConfigError for an empty one."""
    from harness.config import ConfigError

    groups: list[list[str]] = [[]]
    for a in argv:
        if a == NEXT:
            groups.append([])
        else:
            groups[-1].append(a)
    if len(groups) > 1 and any(not g for g in groups):
        n = next(i for i, g in enumerate(groups) if not g) + 1
        raise ConfigError(f"{NEXT}: sweep {n} of {len(groups)} has no overrides (each sweep between {NEXT} separators "
                          "needs its own, e.g. `-m method=none,fastv {NEXT} method=tome budget.value=0.5,0.25`)")
    return groups


def _labels(sweeps: list[tuple[list[str], list[list[str]]]]) -> list[str]:
    """What names each cell in the progress lines and the final table: in one sweep the overrides that vary
    (`_sweep_overrides`); across several, every override of the cell but those that all the cells share."""
    if len(sweeps) == 1:
        combos = sweeps[0][1]
        return [_sweep_overrides(c, combos) for c in combos]
    every = [c for _, combos in sweeps for c in combos]
    shared = set(every[0]).intersection(*map(set, every[1:])) if every else set()
    return [" ".join(o for o in c if o not in shared) or "(defaults)" for c in every]


def _sweep_dir_override(overrides: list[str], base: str, n: int) -> list[str]:
    """Sweep `n`'s own Hydra folder under the command's (`<base>/<n>`), unless its overrides name one."""
    if any(o.lstrip("+~").startswith("hydra.sweep.dir=") for o in overrides):
        return []
    quoted = base.replace("\\", "\\\\").replace("'", "\\'")
    return [f"hydra.sweep.dir='{quoted}/{n}'"]


def _sweep_overrides(combo: list[str], all_combos: list[list[str]]) -> str:
    """The overrides that tell this cell apart from the others (all of them if none vary)."""
    varying = [i for i in range(len(combo)) if len({c[i] for c in all_combos if len(c) == len(combo)}) > 1]
    return " ".join(combo[i] for i in varying) or " ".join(combo) or "(defaults)"


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


def _job_overrides() -> frozenset:
    from hydra.core.hydra_config import HydraConfig

    try:
        return frozenset(HydraConfig.get().overrides.task)
    except Exception:
        return frozenset()


def _job(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    from harness.workers import needs_worker, run_job

    try:
        num = HydraConfig.get().job.num + 1 + _STATE.get("offset", 0)
    except Exception:
        num = "?"
    total = _STATE["total"] or os.environ.get("VTBENCH_SWEEP_TOTAL") or "?"
    _default_group(cfg)
    label = " ".join(sorted(_job_overrides())) or "(defaults)"
    pool = _STATE.get("pool")
    if pool is not None and needs_worker(cfg):  # parallel answering: an idle worker takes it (harness.workers)
        _submit(pool, cfg, num, total, label)
        from harness.execution import yield_now

        yield_now()  # this process computes too (Hydra composing the jobs): a waiting timing part goes first
        return None
    print(f"[vtbench] ===== cell {num}/{total}: {label} =====", file=sys.stderr, flush=True)
    out = run_job(cfg, num)
    if out["status"] == "bad_input":
        _STATE["reasons"][_job_overrides()] = out["reason"]
    return {"key": out["key"], "accuracy": out["accuracy"]} if out["status"] == "complete" else None


# ---- parallel answering (harness.workers) ----------------------------------------------------------------
def _basic_launcher(overrides: list[str]) -> bool:
    """True if the sweep's cells run through Hydra's basic launcher, in this process (the only launcher whose
    cells a worker pool takes over; submitit and SLURM jobs are processes of their own already)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return False
    cfg = _compose_hydra([o.input_line for o in parsed if not o.is_sweep_override()])
    target = str(cfg.hydra.launcher.get("_target_", "")) if cfg is not None else ""
    return target.endswith("BasicLauncher")


def _worker_plan(overrides: list[str] | list[list[str]], combos: list[list[str]]):
    """How many workers answer the sweep's cells (`run.workers`, checked like every value: it may not vary
    within a sweep, nor across the sweeps of one command); None when the cells run one after another in
    this process. `overrides`: the sweep's, or each sweep's (a list of lists)."""
    from harness.results import ResultsStore
    from harness.workers import plan

    todo = 0
    for combo in combos:
        cfg, key = _cell(combo)
        todo += bool(cfg.run.force) or not ResultsStore(cfg.store.dir).is_complete(key)
    p = plan(combos, todo, cfgs=[_cell(c)[0] for c in combos])
    groups = overrides if overrides and isinstance(overrides[0], list) else [overrides]
    return p if p.workers > 1 and all(_basic_launcher(g) for g in groups) else None


def _submit(pool, cfg, num, total, label: str) -> None:
    from hydra.core.hydra_config import HydraConfig

    import json

    from harness.config import resolved
    from harness.results import cell_identity, record_key

    hc = HydraConfig.get()
    if pool.log_dir is None:
        pool.log_dir = Path(hc.sweep.dir)
    logger = cfg.get("logger")
    ident = cell_identity(resolved(cfg))  # cells of one first-use calibration: one computes, the others wait
    calibration = (json.dumps([ident["model"], ident["method"]["name"], ident["calibration"]], sort_keys=True,
                              default=str) if ident.get("calibration") is not None else None)
    pool.submit({"overrides": list(hc.overrides.task), "key": record_key(resolved(cfg)), "num": num,
                 "total": total, "label": label, "calibration": calibration,
                 "log": str(Path(hc.runtime.output_dir) / "cell.log"),
                 "group": logger.get("group") if logger is not None else None})


def _early_fork_server(overrides: list[str]):
    """The workers' fork server, started before the sweep's validation when the sweep may use workers (its
    imports then run beside the validation); None when it will not, or cannot start."""
    from harness.workers import ForkServer, fork_server_wanted

    if not fork_server_wanted(overrides):
        return None
    try:
        return ForkServer()
    except OSError:  # no fork server here: workers start as processes of their own
        return None


def _stop(server) -> None:
    if server is not None:
        server.close()


def run_multirun(overrides: list[str]) -> int:
    import hydra

    from harness.config import CONF_DIR
    from harness.errors import EXIT_BAD_INPUT, EXIT_FAILED, bad_input_errors, error_line, interrupted

    server = _early_fork_server(overrides)  # the workers' imports, while the cells are validated (harness.workers)
    _CELLS.clear()
    _HYDRA_NODES.clear()
    try:
        groups = split_sweeps(overrides)
        sweeps, adapters = [], {}
        for i, group in enumerate(groups):
            try:
                sweeps.append((group, validate_sweep(group, adapters)))
            except bad_input_errors() as e:
                if len(groups) > 1:
                    e.sweep_index = f"sweep {i + 1} of {len(groups)}:"
                raise
        combos = [c for _, cs in sweeps for c in cs]
        plan = _worker_plan([g for g, _ in sweeps], combos)
    except bad_input_errors() as e:
        _stop(server)
        print(f"vtbench: error: {sweep_error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        _stop(server)
        return interrupted("vtbench", e, "nothing ran yet")
    except BaseException:
        _stop(server)
        raise
    if plan is None:  # no workers: the server is not needed
        _stop(server)
        server = None
    _STATE["total"] = len(combos)
    os.environ["VTBENCH_SWEEP_TOTAL"] = str(_STATE["total"])  # for launchers that run cells in other processes
    labels = _labels(sweeps)
    monitor = _monitor(combos, labels).start()
    pool = None
    if plan is not None:
        from harness.workers import WorkerPool

        print(f"[vtbench] {plan.describe()}", file=sys.stderr, flush=True)
        pool = _STATE["pool"] = WorkerPool(plan, server=server)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _entry(cfg):
        return _job(cfg)

    argv = sys.argv
    import time as _time

    base = f"{os.environ.get('VTBENCH_OUTPUTS') or 'multirun'}/{_time.strftime('%Y-%m-%d/%H-%M-%S')}"
    # Hydra's own errors (e.g. a launcher that cannot start: no `srun` outside a SLURM cluster) come back
    # here as exceptions instead of Hydra's printed traceback, and end in one line
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    import contextlib

    launching = contextlib.ExitStack()
    if pool is not None and not plan.gpus and str(plan.device) == "cpu":
        from harness.execution import device_lock

        # going through the jobs (Hydra composes each one) computes on the CPU beside the workers: held shared
        # like their computing, so no cell's timing part runs meanwhile (harness.execution; yields per job)
        launching.enter_context(device_lock(plan.device).shared())
    try:
        offset = 0
        for n, (group, group_combos) in enumerate(sweeps, 1):  # the workers take each sweep's cells as they come
            _STATE["offset"] = offset
            sys.argv = ["vtbench", "--multirun", *group,
                        *(_sweep_dir_override(group, base, n) if len(sweeps) > 1 else [])]
            from hydra.core.global_hydra import GlobalHydra

            if GlobalHydra.instance().is_initialized():
                GlobalHydra.instance().clear()
            _entry()
            offset += len(group_combos)
        launching.close()
        if pool is not None:  # the cells handed to workers
            pool.join()
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143)
        if pool is not None:
            pool.terminate()
        return interrupted("vtbench", e, "rerun the same command to resume")
    except SystemExit as e:  # hydra exits on its own errors
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else EXIT_FAILED
    except Exception as e:  # the sweep machinery itself failed (launcher, sweeper)
        from harness.errors import failure_reason

        print(f"vtbench: error: the sweep could not run: {failure_reason(e)} (rerun the same command to resume)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        launching.close()
        if pool is not None:
            pool.terminate()  # nothing left after a join; after an error, no worker outlives the sweep
            _STATE["reasons"].update(pool.reasons)
            _STATE["pool"] = None
        _STATE["offset"] = 0
        monitor.stop()
        sys.argv = argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    try:
        monitor.summary()
        failed = cell_outcomes(combos)
    except KeyboardInterrupt as e:
        return interrupted("vtbench", e, "rerun the same command to resume")
    finally:
        _CELLS.clear()  # the next sweep of this process composes its own cells
        _HYDRA_NODES.clear()
    if failed:
        label = {tuple(c): lab for c, lab in zip(combos, labels)}
        names = "; ".join(f"[{label.get(tuple(c)) or _sweep_overrides(c, combos)}] {why}" for c, why in failed)
        print(f"vtbench: {len(failed)} of {len(combos)} cells failed (rerun the same command to retry them): {names}",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0
