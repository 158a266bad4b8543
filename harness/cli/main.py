"""`vtbench`: evaluate one cell, or a Hydra multirun sweep of cells.

    vtbench                                     # tiny model, method none, shapes (the defaults)
    vtbench method=fastv method.params.R=0.75 run.limit=64
    vtbench -m method=none,fastv,tome           # a sweep (Hydra multirun; resumable)
    vtbench -m method=none,blind --next method=fastv budget.kind=tokens budget.value=0.5,0.25
                                                # several sweeps as one (one pool of workers)
    vtbench --help

Errors in the configuration, the method parameters, the model or the data end in one line on
stderr and exit code 2 before anything is written; a run-time failure of the cell (e.g. out of
memory), or a cell in which every sample failed, is recorded as a failed record and exits 1 in one
line; Ctrl-C exits with 130 and SIGTERM (SLURM's time-out / pre-emption signal) with 143, in one line,
and the cell resumes on the next run from its per-sample answers. A sweep exits 2 before any cell
runs if any cell has bad input, 1 if any cell failed (the last line names them), 0 otherwise.
"""
from __future__ import annotations

import os
import sys

USAGE = """usage: vtbench [-m|--multirun] [key=value ...] [--next key=value ...]
       vtbench --cfg job|hydra|all [--resolve] [--package P] [key=value ...]   (print the composed config)
       vtbench --info [topic] | --hydra-help | -sc install=bash|zsh|fish     (Hydra's own flags)

Config groups (conf/):  model=<{models}>
                        method=<{methods}>
                        benchmark=<{benchmarks}>
                        logger=<{loggers}>   experiment=<{experiments}>
Common keys:            run.limit=N run.batch_size=N run.seed=N run.device=cpu|cuda run.force=true
                        method.params.<name>=<value>   store.dir=PATH   data_dir=PATH
Compositions:           method=shortv_fastv | redundancylens_fastv (one layer-wise + one token-dropping
                        member, applied in that order; budgets set the token-dropping member), or
                        method=compose 'method.params.members=[{{name: shortv, params: {{layers: [31, 0]}}}},
                        {{name: fastv, params: {{K: 2, R: 0.5}}}}]'   (README, "Compositions")
"""

#: exit codes and errors (see harness.errors)
from harness.errors import (  # noqa: E402,F401
    EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, bad_input_errors, error_line, failure_reason,
)


def _usage() -> str:
    from harness.config import group_options

    opts = {g: "|".join(group_options(g)) for g in ("model", "method", "benchmark", "logger", "experiment")}
    return USAGE.format(
        models=opts["model"],
        methods=opts["method"],
        benchmarks=opts["benchmark"],
        loggers=opts["logger"],
        experiments=opts["experiment"] or "-",
    )


def format_record(rec: dict) -> str:
    cell = rec["cell"]
    eff = rec.get("efficiency") or {}
    flops = ((eff.get("flops") or {}).get("prefill") or {}).get("total")
    lat = ((eff.get("latency") or {}).get("prefill_ms") or {}).get("median")
    acc = rec.get("accuracy")
    rows = [
        ("model", cell["model"]["name"]),
        ("method", rec.get("method_description", cell["method"]["name"])),
        ("benchmark", f"{cell['benchmark']['name']} ({cell['benchmark']['task']})"),
        (rec.get("primary_metric", "accuracy"), "n/a" if acc is None else f"{acc:.4f}"),
        ("samples", f"{rec.get('n_samples')} (failed {rec.get('n_failed')}, empty {rec.get('n_empty')}, "
                    f"non-finite {rec.get('n_nonfinite', 0)})"),
    ]
    if eff.get("visual_tokens_llm") is not None:
        rows.append(("visual tokens", f"{eff['visual_tokens_in']:.0f} in prompt, {eff['visual_tokens_llm']:.0f} at LLM input, "
                                      f"{eff.get('visual_tokens_mean_per_layer') or 0:.1f}/layer"))
    if flops is not None:
        rows.append(("prefill FLOPs", f"{flops:.4g} (fvcore, 2 x MACs)"))
    if lat is not None:
        rows.append(("prefill latency", f"{lat:.1f} ms"))
    rows.append(("record", rec["key"]))
    w = max(len(k) for k, _ in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (VALUE_WIDTH + 2) + "+"
    body = []
    for k, v in rows:  # a long value (a composition's members and parameters) wraps, never cut
        for i, part in enumerate(_wrap(str(v), VALUE_WIDTH)):
            body.append(f"| {k if i == 0 else '':<{w}} | {part:<{VALUE_WIDTH}} |")
    return f"{line}\n" + "\n".join(body) + f"\n{line}"


#: width of the value column of the single-cell summary table
VALUE_WIDTH = 46


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken after a comma or a space where one is near
    the end of the line, else at `width`: every character is kept."""
    out = []
    while len(text) > width:
        cut = max(text.rfind(", ", 0, width) + 1, text.rfind(" ", 0, width))
        cut = cut if cut > width // 2 else width
        out.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return out + [text]


#: Hydra's own command-line flags that `vtbench` hands to Hydra (after its own one-line checks)
HYDRA_FLAGS = ("--cfg", "-c", "--resolve", "--info", "-i", "--hydra-help", "-sc", "--shell-completion",
               "--package", "-p")


def uses_hydra_flags(argv: list[str]) -> bool:
    return any(a in HYDRA_FLAGS or a.split("=", 1)[0] in HYDRA_FLAGS for a in argv)


def run_hydra_flags(argv: list[str]) -> int:
    """`--cfg job|hydra|all` (`-c`), `--resolve`, `--package`, `--info [topic]`, `--hydra-help`,
    `-sc install=bash|zsh|fish` / `query=...`: Hydra's standard flags, answered by Hydra itself; a
    malformed flag or config is one line and exit 2 first (Hydra would print a traceback or its usage)."""
    import hydra
    from hydra._internal.utils import get_args_parser

    from harness.config import CONF_DIR, ConfigError, compose_config

    parser = get_args_parser()

    def error(message: str):
        raise ConfigError(f"{message.splitlines()[0]} (Hydra flags: --cfg job|hydra|all [--resolve] [--package P], "
                          "--info [topic], --hydra-help, -sc install=bash|zsh|fish)")

    parser.error = error
    args = parser.parse_args(argv)
    if args.multirun or args.run:
        raise ConfigError("--cfg/--info/--hydra-help/-sc cannot be combined with -m/--multirun or -r/--run")
    if args.resolve and args.cfg is None:
        raise ConfigError("--resolve: only with --cfg job|hydra|all")
    if args.package is not None and args.cfg is None:
        raise ConfigError(f"--package={args.package}: only with --cfg job|hydra|all")
    if not args.shell_completion and not args.hydra_help:
        compose_config(args.overrides)  # bad overrides: one line here, not Hydra's multi-line report

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _entry(cfg):  # pragma: no cover - these flags never run the task
        raise RuntimeError("a Hydra flag ran the task")

    import contextlib
    import io

    old = sys.argv
    sys.argv = [old[0] if old and old[0] else "vtbench", *argv]
    err = io.StringIO()  # Hydra writes its own errors (e.g. `package 'x' not found in config`) unprefixed
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            _entry()
    except SystemExit as e:  # Hydra reports its own errors and exits 1
        code = EXIT_BAD_INPUT if e.code not in (0, None) else 0
    finally:
        sys.argv = old
    text = err.getvalue()
    if code:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = lines[0] if lines else "Hydra refused the flags"
        if args.package is not None and "package" in why:
            why = f"--package={args.package}: {why}"
        print(f"vtbench: error: {why}", file=sys.stderr, flush=True)
    elif text:
        sys.stderr.write(text)
    return code


def save_hydra_dir(overrides: list[str]) -> str | None:
    """Save the composed config of a single run where Hydra users look for it:
    `<hydra.run.dir>/.hydra/{config,overrides,hydra}.yaml` (`hydra.run.dir`: `outputs/<date>/<time>`, or
    under `$VTBENCH_OUTPUTS`). Returns the folder, None if it cannot be written (a warning, never a failure)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf, open_dict

    from harness.config import CONF_DIR

    try:
        setup_globals()
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        GlobalHydra.instance().clear()
        hydra_node = cfg.hydra
        run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
        out = run_dir / str(hydra_node.output_subdir or ".hydra")
        with open_dict(cfg):
            del cfg["hydra"]
        from harness.paths import all_or_nothing, atomic_write

        with all_or_nothing():
            atomic_write(out / "config.yaml", OmegaConf.to_yaml(cfg))
            atomic_write(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
            atomic_write(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_node})))
        return str(out)
    except Exception as e:  # noqa: BLE001 - a convenience copy must never fail the run
        print(f"[vtbench] warning: could not save the config under hydra.run.dir: {type(e).__name__}: {e}",
              file=sys.stderr)
        return None


def run_one(overrides: list[str]) -> int:
    from harness.config import compose_config
    from harness.runner import efficiency_fn, run_cell

    errors = bad_input_errors()
    cfg = None
    try:
        from harness.config import check_outputs

        check_outputs()
        cfg = compose_config(overrides)
        rec = run_cell(cfg, efficiency_fn=efficiency_fn())
    except errors as e:
        print(f"vtbench: error: {error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143)
        from harness.errors import interrupted

        save_hydra_dir(overrides)
        return interrupted("vtbench", e)
    except Exception as e:  # a run-time failure (out of memory, kernel error): record it, one line
        from harness.runner import write_failed

        reason = failure_reason(e)
        if cfg is not None:
            write_failed(cfg, reason)
        save_hydra_dir(overrides)
        print(f"vtbench: cell failed: {reason} (recorded as failed; rerun to retry)", file=sys.stderr)
        return EXIT_FAILED
    saved = save_hydra_dir(overrides)
    if saved:
        print(f"[vtbench] composed config saved under {saved}/", file=sys.stderr)
    if rec.get("status") != "complete":  # e.g. every sample failed: a failed cell, not a complete one
        print(f"vtbench: cell failed: {rec.get('error')} (recorded as failed; rerun to retry)", file=sys.stderr)
        return EXIT_FAILED
    print(format_record(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C / SIGINT always interrupts cleanly (exit 130, cell resumable), even when started from a
    # non-interactive shell that runs background jobs with SIGINT ignored; SIGTERM likewise (exit 143)
    from harness.errors import install_signal_handlers

    install_signal_handlers()
    if any(a in ("-h", "--help") for a in argv):
        print(_usage() + "\n" + (__doc__ or ""))
        return 0
    if uses_hydra_flags(argv):
        try:
            return run_hydra_flags(argv)
        except bad_input_errors() as e:
            print(f"vtbench: error: {error_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if any(a in ("-m", "--multirun") for a in argv):
        from harness.sweep import run_multirun

        return run_multirun([a for a in argv if a not in ("-m", "--multirun")])
    if "--next" in argv:
        print("vtbench: error: --next separates the sweeps of a multirun: vtbench -m <sweep> --next <sweep>",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_one(argv)


if __name__ == "__main__":
    sys.exit(main())
