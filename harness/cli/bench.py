"""`vtbench-bench`: the command line of the performance benchmark
(`harness.bench`)."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import harness.bench
from harness.bench.core import Bench
from harness.bench.gpu import GPU_ARCHS, GPU_BATCH_METHODS, GPU_BUDGET_S, GPU_PARTS, NO_GPU_LINE, run_gpu_full
from harness.bench.measure import CLOCK, loadavg, machine_name
from harness.bench.render import bench_meta, write_report
from harness.bench.setup import ALL_METHODS, COMPOSITIONS, METHODS, PARTS, Spec, full_config


def _parser():
    from harness.cli.common import ArgumentParser, creatable_dir, name_list, nonempty, plain_name, positive_int

    ap = ArgumentParser(prog="vtbench-bench", description=harness.bench.__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench", type=creatable_dir)
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repetition (smoke test)")
    ap.add_argument("--repeats", type=positive_int, default=None, help="prefill repetitions (default 5; generate: 3/5 of it)")
    ap.add_argument("--parts", default=None, type=name_list, help=f"comma-separated subset of {','.join(PARTS)} (default: all; "
                    f"with --gpu-full: {','.join(GPU_PARTS)})")
    ap.add_argument("--methods", default=None, type=name_list, help=f"methods of the methods part (default: {','.join(METHODS)}; "
                    f"with --gpu-full also {','.join(COMPOSITIONS)})")
    ap.add_argument("--batch-methods", default=None, type=name_list, help="methods of the batch part (default: none; with "
                    f"--gpu-full: {','.join(GPU_BATCH_METHODS)})")
    ap.add_argument("--flops-methods", default=None, type=name_list, help="methods of the flops part (default: --methods)")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default 2 on CPU)")
    ap.add_argument("--device", default=None, type=nonempty, help="cpu (default), cuda, cuda:N")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--arch", default=None, type=nonempty, help="full architecture from conf/model (llava15_7b, llava_next_7b, ...; "
                    "GPU); with --gpu-full a comma-separated list (default: " + ",".join(GPU_ARCHS) + ")")
    ap.add_argument("--machine", default=None, type=plain_name,
                    help="report name, a folder under --out (default: the CPU/GPU model)")
    ap.add_argument("--model-arg", action="append", default=[], metavar="KEY=INT",
                    help="override a size of the random model (build_tiny argument), e.g. num_layers=8")
    ap.add_argument("--gpu-full", action="store_true",
                    help="the GPU benchmark (`make bench-gpu`): full-size random LLaVA-1.5-7B and LLaVA-NeXT-7B in "
                         "fp16, every method, methods/scores/batch parts, under a wall-clock budget; one line and "
                         "exit 0 on a machine without a CUDA GPU")
    ap.add_argument("--budget-s", type=positive_int, default=None,
                    help=f"--gpu-full: wall-clock budget of the measurements in seconds (default {GPU_BUDGET_S})")
    return ap


def _names(given: list[str] | None, default, ap, what: str) -> list[str]:
    """A method list (`--methods a,b`) with `none` first (the reference); unknown names are bad input."""
    names = list(given) if given is not None else list(default)
    bad = [n for n in names if n not in ALL_METHODS]
    if bad:
        ap.error(f"{what} {','.join(bad)}: unknown method(s); choose from {', '.join(ALL_METHODS)}")
    return ["none"] + [n for n in dict.fromkeys(names) if n != "none"]


def _parts(given: list[str] | None, allowed, ap) -> list[str]:
    parts = list(given) if given is not None else list(allowed)
    bad = [p for p in parts if p not in allowed]
    if bad:
        ap.error(f"--parts {','.join(bad)}: unknown part(s); choose from {', '.join(allowed)}")
    return parts


def run(argv: list[str] | None = None) -> dict:
    from harness.cli.common import positive_int

    ap = _parser()
    a = ap.parse_args(argv)
    command = "vtbench-bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.gpu_full:
        return gpu_full_cli(ap, a, command)
    from harness.config import DEVICE_RE, device_error, group_options

    device = a.device or "cpu"
    if a.budget_s is not None:
        ap.error("--budget-s applies to --gpu-full only")
    if not DEVICE_RE.match(device) or device_error(device):
        ap.error(f"--device {device}: {device_error(device) if DEVICE_RE.match(device) else 'not a device (cpu, cuda, cuda:N, mps)'}")
    if a.arch is not None and a.arch not in group_options("model"):
        ap.error(f"--arch {a.arch}: choose from {', '.join(group_options('model'))}")
    if a.arch is not None:
        try:
            full_config(a.arch)
        except ValueError as e:
            ap.error(f"--arch {e}")
    parts = _parts(a.parts, PARTS, ap)
    names = _names(a.methods, METHODS, ap, "--methods")
    batch_names = _names(a.batch_methods, ("none",), ap, "--batch-methods")  # every list checked up front
    fm = list(a.flops_methods) if a.flops_methods is not None else [n for n in names if n in METHODS]
    if any(m not in METHODS for m in fm):  # the compositions have no `vtbench-flops` overrides here
        ap.error(f"--flops-methods {','.join(m for m in fm if m not in METHODS)}: choose from {', '.join(METHODS)}")
    spec = Spec.make(a.quick, a.repeats, a.threads, device)
    for kv in a.model_arg:
        k, _, v = kv.partition("=")
        if k not in spec.model:
            ap.error(f"--model-arg {k!r}: choose from {', '.join(spec.model)}")
        try:
            spec.model[k] = positive_int(v)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--model-arg {kv}: {e}")
    torch.set_num_threads(spec.threads)
    CLOCK[0] = time.process_time if a.clock == "cpu" else time.perf_counter
    bench = Bench(spec, arch=a.arch)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"meta": bench_meta(
        spec, a.machine or machine_name(spec.device), command, a.clock,
        a.arch or "random LLaVA-1.5-shaped " + ", ".join(f"{k}={v}" for k, v in spec.model.items()))}
    if "flops" in parts:  # first: a command-line tool's speed on the machine before the timing parts load it
        res["flops"] = bench.flops(fm, repeats=1 if spec.quick else 3)
    if "overhead" in parts:
        res["overhead"] = bench.overhead()
    if "methods" in parts:
        res["methods"] = bench.methods(names)
    if "scores" in parts:
        res["scores"] = bench.scores()
    if "batch" in parts:
        res["batch"] = bench.batch(batch_names)
    if "sweep" in parts:  # last: its subprocesses load the machine (serial vs parallel sweep)
        res["sweep"] = bench.sweep()
    CLOCK[0] = time.perf_counter
    res["meta"]["loadavg_end"] = loadavg()
    res["meta"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["paths"] = write_report(res, Path(a.out) / res["meta"]["machine"])
    bench.log(f"wrote {res['paths']['md']} ({res['meta']['wall_seconds']}s)")
    return res


def gpu_full_cli(ap, a, command: str) -> dict:
    """`--gpu-full` from the command line: checks, then `run_gpu_full`. Without a CUDA GPU: one line, exit 0,
    nothing written."""
    from harness.config import device_error

    for flag, bad in (("--quick", a.quick), ("--clock cpu", a.clock == "cpu"), ("--model-arg", a.model_arg),
                      ("--threads", a.threads), ("--flops-methods", a.flops_methods)):
        if bad:
            ap.error(f"{flag} does not apply to --gpu-full")
    device = a.device or "cuda"
    if not re.match(r"^cuda(:\d+)?$", device):
        ap.error(f"--device {device}: --gpu-full runs on a CUDA device (cuda, cuda:N)")
    archs = [x.strip() for x in (a.arch or ",".join(GPU_ARCHS)).split(",") if x.strip()]
    for arch in archs:
        try:
            full_config(arch)
        except ValueError as e:
            ap.error(f"--arch {e}")
        except Exception as e:  # noqa: BLE001 - an unknown config group option: one line
            ap.error(f"--arch {arch}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    parts = _parts(a.parts, GPU_PARTS, ap)
    names = _names(a.methods, ALL_METHODS, ap, "--methods")
    batch_names = _names(a.batch_methods, GPU_BATCH_METHODS, ap, "--batch-methods")
    if not torch.cuda.is_available():
        print(NO_GPU_LINE, flush=True)
        return {"skipped": NO_GPU_LINE}
    if device_error(device):
        ap.error(f"--device {device}: {device_error(device)}")
    if ":" in device:
        torch.cuda.set_device(device)
    return run_gpu_full(out=Path(a.out), device=device, archs=archs, names=names, parts=parts,
                        batch_names=batch_names, repeats=a.repeats, budget_s=a.budget_s or GPU_BUDGET_S,
                        machine=a.machine, command=command)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from harness.cli.common import run_script

    def _run(argv):
        res = run(argv)
        if res.get("failed"):  # --gpu-full: an architecture failed (its report says why)
            print(f"vtbench-bench: failed: {'; '.join(res['failed'])}", file=sys.stderr, flush=True)
            return 1
        return 0

    return run_script("vtbench-bench", _run, argv, interrupt_note="reports are written only at the end; rerun")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
