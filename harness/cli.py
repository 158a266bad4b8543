"""`vtbench`: evaluate one cell, or a Hydra multirun sweep of cells.

    vtbench                                     # tiny model, method none, shapes (the defaults)
    vtbench method=fastv method.params.R=0.75 run.limit=64
    vtbench -m method=none,fastv,tome           # a sweep (Hydra multirun; resumable)
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

USAGE = """usage: vtbench [-m|--multirun] [key=value ...]

Config groups (conf/):  model=<{models}>
                        method=<{methods}>
                        benchmark=<{benchmarks}>
                        logger=<{loggers}>   experiment=<{experiments}>
Common keys:            run.limit=N run.batch_size=N run.seed=N run.device=cpu|cuda run.force=true
                        method.params.<name>=<value>   store.dir=PATH   data_dir=PATH
"""

#: exit codes (see harness.console)
from harness.console import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED  # noqa: E402,F401


def failure_reason(e: BaseException) -> str:
    """One line naming a run-time failure (`OutOfMemoryError: CUDA out of memory ...`)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


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


def bad_input_errors() -> tuple[type[BaseException], ...]:
    from harness.benchmarks.prepare import BenchmarkDataError
    from harness.config import ConfigError
    from harness.models.adapter import NotApplicable
    from harness.models.loading import ModelLoadError
    from harness.results import StoreError
    from methods import MethodError
    from omegaconf.errors import OmegaConfBaseException  # e.g. an unknown ${resolver:...} in a value

    return (ConfigError, MethodError, NotApplicable, ModelLoadError, BenchmarkDataError, StoreError,
            OmegaConfBaseException)


def error_line(e: BaseException) -> str:
    """The one line shown for a bad-input error (OmegaConf's own messages span several lines)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    if key and key not in line:
        line += f" (in {key})"
    return line


def efficiency_fn():
    """The efficiency probe, if the efficiency package is available."""
    try:
        from harness.efficiency.probe import measure_cell
    except ImportError:
        return None
    return measure_cell


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
    line = "+" + "-" * (w + 2) + "+" + "-" * 48 + "+"
    body = "\n".join(f"| {k:<{w}} | {str(v)[:46]:<46} |" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def run_one(overrides: list[str]) -> int:
    from harness.config import compose_config
    from harness.runner import run_cell

    errors = bad_input_errors()
    cfg = None
    try:
        cfg = compose_config(overrides)
        rec = run_cell(cfg, efficiency_fn=efficiency_fn())
    except errors as e:
        print(f"vtbench: error: {error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143)
        from harness.console import interrupted

        return interrupted("vtbench", e)
    except Exception as e:  # a run-time failure (out of memory, kernel error): record it, one line
        from harness.runner import write_failed

        reason = failure_reason(e)
        if cfg is not None:
            write_failed(cfg, reason)
        print(f"vtbench: cell failed: {reason} (recorded as failed; rerun to retry)", file=sys.stderr)
        return EXIT_FAILED
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
    from harness.console import install_signal_handlers

    install_signal_handlers()
    if any(a in ("-h", "--help") for a in argv):
        print(_usage() + "\n" + (__doc__ or ""))
        return 0
    if any(a in ("-m", "--multirun") for a in argv):
        from harness.sweep import run_multirun

        return run_multirun([a for a in argv if a not in ("-m", "--multirun")])
    return run_one(argv)


if __name__ == "__main__":
    sys.exit(main())
