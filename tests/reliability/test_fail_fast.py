"""Fail fast and tell the truth (issue 17, items 7 and 8).

* Every value of every cell is validated for type, range and finiteness — and against the model's
  architecture on the meta device — before anything heavy runs: bad input is one line naming the key
  and the value, exit 2, no model load, nothing written. The class of problem is tested, not single
  examples: every numeric key of run / budget / calibration / benchmark and every numeric parameter of
  every registered method, with NaN, infinities, a string, a bool, a list, a negative number and zero
  where zero is invalid.
* In a sweep too (command-line sweeps and an experiment's `hydra.sweeper.params`): nothing runs if any
  cell is bad.
* Exit status: a cell in which every sample failed is a failed cell (exit 1); a sweep with a failed
  cell exits 1 and names it; SIGTERM is Ctrl-C with exit 143; every console script gives one line and
  exit 2 for a malformed value, never a traceback.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from harness.cli.main import run_one
from tests.reliability.helpers import cell_args, env_for, kill_when, progress, records, start
from tests.reliability.helpers import our_lines as helper_lines
from tests.reliability.test_bad_inputs import args, no_model_load, nothing_written, one_line_error  # noqa: F401

pytestmark = pytest.mark.bad_input

BIN = Path(sys.executable).parent


def _norm(text: str) -> str:
    return text.replace(" ", "").replace("'", "")


def assert_names(line: str, key: str, value: str) -> None:
    """The error line names the key and the value as given (`key=value`)."""
    assert _norm(f"{key}={value}") in _norm(line), line


# ---- every numeric key of the config, every bad value -------------------------------------------------
#: numeric config keys: (key, smallest valid value, extra overrides that make the key matter)
NUMERIC_KEYS = [
    ("run.limit", 1, []),
    ("run.batch_size", 1, []),
    ("run.seed", 0, []),
    ("run.max_new_tokens", 1, []),
    ("run.efficiency.probe_size", 1, []),
    ("run.efficiency.flops_docs", 1, []),
    ("run.efficiency.warmup", 0, []),
    ("run.efficiency.repeats", 1, []),
    ("run.efficiency.decode_tokens", 1, []),
    ("run.workers", 1, []),  # an integer >= 1 or auto (harness.workers)
    ("run.threads", 1, []),  # null or an integer >= 1
    ("budget.value", "open0", ["method=fastv", "budget.kind=tokens"]),  # (0, ...]: zero is invalid
    ("budget.text_tokens", 1, ["method=fastv", "budget.kind=flops", "budget.value=0.5"]),
    ("calibration.n", 1, []),
    ("calibration.seed", 0, []),
    ("calibration.batch_size", 1, []),
    ("calibration.tail", 0, []),
    ("calibration.alpha", 0.0, []),
    ("benchmark.seed", 0, []),
]
TYPE_VALUES = ["nan", "inf", "-inf", "abc", "true", "[1,2]"]


def _config_cases():
    for key, lo, extra in NUMERIC_KEYS:
        values = list(TYPE_VALUES) + ["-1"]
        if lo == 1 or lo == "open0":
            values.append("0")
        for v in values:
            yield pytest.param(key, v, extra, id=f"{key}={v}")


@pytest.mark.parametrize("key, value, extra", list(_config_cases()))
def test_every_numeric_config_key_refuses_bad_values(key, value, extra, args, tmp_path, capsys, no_model_load):
    rc = run_one(args + extra + [f"{key}={value}"])
    line = one_line_error(capsys, rc)
    assert_names(line, key, value)
    nothing_written(tmp_path / "store")


def test_the_numeric_key_list_covers_the_config():
    """Every integer/float key of run, budget, calibration and benchmark of the default config (and a
    budget's) is in NUMERIC_KEYS: a key added later is validated or this fails."""
    from omegaconf import OmegaConf

    from harness.config import compose_config

    cfg = OmegaConf.to_container(compose_config(["method=fastv", "budget.kind=tokens", "budget.value=0.5"]),
                                 resolve=True)
    found = set()

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) or (v is None and k in ("limit", "max_new_tokens")):
                found.add(f"{prefix}{k}")

    for group in ("run", "budget", "calibration", "benchmark"):
        walk(cfg[group], f"{group}.")
    assert found <= {k for k, _, _ in NUMERIC_KEYS}, found - {k for k, _, _ in NUMERIC_KEYS}


def _method_cases():
    import methods

    for name in methods.available():
        cls = methods.get(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            members = typing.get_args(hints[f.name]) or (hints[f.name],)
            bases = {typing.get_origin(m) or m for m in members}
            if not bases & {int, float}:
                continue  # strings, booleans, layer lists ('auto' or indices), nested parameter dicts
            for v in TYPE_VALUES:
                if v == "[1,2]" and bases & {list, tuple}:
                    continue  # tome's r takes a per-layer list
                yield pytest.param(name, f.name, v, id=f"{name}.{f.name}={v}")


@pytest.mark.parametrize("method, param, value", list(_method_cases()))
def test_every_numeric_method_parameter_refuses_bad_values(method, param, value, args, tmp_path, capsys,
                                                          no_model_load):
    """Shared (methods.build): no method sees a NaN, an infinity, a string, a bool or a list where a
    number is meant — whatever its own checks do."""
    rc = run_one(args + [f"method={method}", f"method.params.{param}={value}"])
    line = one_line_error(capsys, rc)
    assert param in line and (_norm(value) in _norm(line) or value == "true" and "True" in line), line
    nothing_written(tmp_path / "store")


def test_nested_method_parameters_refuse_non_finite_values(args, tmp_path, capsys, no_model_load):
    """FiCoCo-VL passes stage parameters through dicts: a NaN inside one is refused as well."""
    rc = run_one(args + ["method=ficoco_vl", "+method.params.vision_params.lam=nan"])
    line = one_line_error(capsys, rc)
    assert "nan" in line and "vision_params" in line, line
    nothing_written(tmp_path / "store")


# ---- the cases named in the issue ----------------------------------------------------------------------
@pytest.mark.parametrize("extra, key, value", [
    (["method=fastv", "budget.kind=flops", "budget.value=nan"], "budget.value", "nan"),
    (["method=ficoco_v", "method.params.penalty_scale=nan"], "method.params.penalty_scale", "nan"),
    (["run.seed=-1"], "run.seed", "-1"),
    (["method=fastv", "method.params.R=abc"], "method.params.R", "abc"),
    (["run.efficiency.warmup=abc"], "run.efficiency.warmup", "abc"),
    (["benchmark.seed=abc"], "benchmark.seed", "abc"),
    (["+run.typo=5"], "run.typo", "5"),
    (["++run.typo=5"], "run.typo", "5"),
    (["+budget.ratio=0.5"], "budget.ratio", "0.5"),
    (["+typo=5"], "typo", "5"),
    (["+logger.projet=x"], "logger.projet", "x"),
    (["run.typo=5"], "run.typo", "5"),
    (["budget.value=0.5"], "budget.value", "0.5"),  # a value without a kind would be silently ignored
    (["model.chat_template='{% for m in messages %}{{ m.content '"], "model.chat_template", ""),
    (["model.chat_template='{% if %}'"], "model.chat_template", "{% if %}"),
    (["model.chat_template='{{ messages[0].nosuch.attr }}'"], "model.chat_template", ""),
    (["model.chat_template=''"], "model.chat_template", ""),
    (["logger=wandb", "logger.log_samples=3"], "logger.log_samples", "3"),
    (["logger=wandb", "logger.mode=loud"], "logger.mode", "loud"),
    (["run.force=maybe"], "run.force", "maybe"),
    (["calibration.benchmark=nosuch"], "calibration.benchmark", "nosuch"),
    (["model.arch.text_config.rms_norm_eps=nan", "model=llava15_7b"], "model.arch", ""),
    # the budget audit: counts must be whole, explicit parameters a budget sets are refused, ranges, keys
    (["method=fastv", "budget.kind=tokens", "budget.value=1.5"], "budget.value", "1.5"),
    (["method=tome", "budget.kind=tokens", "budget.value=2.5"], "budget.value", "2.5"),
    (["method=tome", "method.params.prompt_tokens=1.5"], "method.params.prompt_tokens", "1.5"),
    (["method=fastv", "method.params.keep=10", "budget.kind=tokens", "budget.value=0.33"], "method.params.keep", "10"),
    (["method=random", "method.params.keep_ratio=0.5", "budget.kind=tokens", "budget.value=8"],
     "method.params.keep_ratio", "0.5"),
    (["method=shortv_fastv", "method.params.members.1.params.keep=10", "budget.kind=tokens", "budget.value=0.33"],
     "method.params.members.1.params.keep", "10"),
    (["method=random", "method.params.seed=-1"], "method.params.seed", "-1"),
    (["method=random", "method.params.seed=4294967296"], "method.params.seed", "4294967296"),
    (["method=redundancylens", "method.params.seed=-1"], "method.params.seed", "-1"),
    (["method=fastv", "method.params.keep=0"], "method.params.keep", "0"),
    (["method=random", "method.params.keep=0"], "method.params.keep", "0"),
    (["method=fastv", "method.params.keep=2.5"], "method.params.keep", "2.5"),
    (["method=ficoco_l", "method.params.final_tokens=1.5"], "method.params.final_tokens", "1.5"),
    (["method=fastv", "method.params.K=0"], "method.params.K", "0"),
    (["method=fastv", "method.params.K=8"], "method.params.K", "8"),                # past the model's 8 layers
    (["method=ficoco_v", "method.params.tokens=0"], "method.params.tokens", "0"),
    (["method=shortv", "method.params.layers=auto", "method.params.N=2", "calibration.dir=/etc/hostname"],
     "calibration.dir", "/etc/hostname"),
    (["method=shortv", "method.params.layers=auto", "method.params.N=2", "calibration.dir=/etc/hostname/sub"],
     "calibration.dir", "/etc/hostname/sub"),
    (["method=shortv", "method.params.layers=auto", "method.params.N=2", "calibration.n=100000000"],
     "calibration.n", "100000000"),
    (["method=redundancylens_fastv", "calibration.n=501", "budget.kind=tokens", "budget.value=0.33"],
     "calibration.n", "501"),
])
def test_named_bad_inputs(extra, key, value, args, tmp_path, capsys, no_model_load):
    rc = run_one(args + extra)
    line = one_line_error(capsys, rc)
    assert key in line, line
    if value:
        assert_names(line, key, value)
    nothing_written(tmp_path / "store")


def test_open_keys_still_accept_additions():
    """`+` is refused only for vtbench's closed config: method parameters (checked by the method registry)
    and `model.arch` (a copy of config.json) stay open, as does Hydra's own config."""
    from harness.config import compose_config, validate

    cfg = compose_config(["model=llava15_7b", "+model.arch.text_config.rope_theta=10000.0", "++run.limit=5"])
    assert cfg.model.arch.text_config.rope_theta == 10000.0 and cfg.run.limit == 5
    assert validate(cfg, check_device=False).name == "none"


def test_unavailable_devices_are_bad_input(args, tmp_path, capsys, no_model_load):
    import torch

    devices = [f"cuda:{torch.cuda.device_count()}"]  # one past the last GPU, on any machine
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not (torch.backends.mps.is_available()):
        devices.append("mps")
    for device in devices:
        rc = run_one(args + [f"run.device={device}"])
        line = one_line_error(capsys, rc)
        assert_names(line, "run.device", device)
    nothing_written(tmp_path / "store")


# ---- a cell in which every sample failed ---------------------------------------------------------------
def _every_generation_fails(monkeypatch):
    from harness.lmms_model import VTBenchLMM

    def generate_batch(self, *a, **k):
        raise RuntimeError("the chat template produced nothing usable")

    monkeypatch.setattr(VTBenchLMM, "generate_batch", generate_batch)


def test_a_cell_whose_every_sample_failed_is_failed(args, tmp_path, capsys, monkeypatch):
    from harness.results import ResultsStore, load

    _every_generation_fails(monkeypatch)
    rc = run_one(args)
    line = one_line_error(capsys, rc, code=1)
    assert "all 3 samples failed" in line and "RuntimeError" in line, line
    (rec,) = [r for _, r, _ in ResultsStore(tmp_path / "store").iter_records()]
    assert rec["status"] == "failed" and rec["n_failed"] == rec["n_samples"] == 3
    assert load(tmp_path / "store").empty  # never aggregated
    monkeypatch.undo()
    assert run_one(args) == 0  # a rerun retries it
    (rec,) = [r for _, r, _ in ResultsStore(tmp_path / "store").iter_records()]
    assert rec["status"] == "complete" and rec["n_failed"] == 0


def test_a_cell_with_some_failed_samples_completes(args, tmp_path, capsys, monkeypatch):
    """The line is drawn at *every* sample: a partly failed cell completes, its failures flagged."""
    from harness.lmms_model import VTBenchLMM
    from harness.results import ResultsStore

    real, calls = VTBenchLMM.generate_batch, {"n": 0}

    def generate_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("one bad sample")
        return real(self, *a, **k)

    monkeypatch.setattr(VTBenchLMM, "generate_batch", generate_batch)
    assert run_one(args) == 0
    (rec,) = [r for _, r, _ in ResultsStore(tmp_path / "store").iter_records()]
    assert rec["status"] == "complete" and rec["n_failed"] == 1


# ---- sweeps ------------------------------------------------------------------------------------------------
def test_sweep_with_a_bad_cell_runs_nothing(args, tmp_path, capsys, monkeypatch, no_model_load):
    """`-m method=fastv method.params.K=2,8` on an 8-layer model: K=8 is past the model (meta-device
    check), so cell 1 (K=2, valid) must not run either."""
    from harness.sweep import run_multirun

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    for bad in (["method=fastv", "method.params.K=2,8"], ["method=fastv", "method.params.R=0.5,nan"],
                ["method=none,fastv", "run.seed=0,-1"], ["method=none", "run.device=cpu,cuda:99"],
                ["method=fastv", "budget.kind=tokens", "budget.value=0.5,65"],
                ["method=fastv,random", "budget.kind=tokens", "budget.value=0.5,1.5"],
                ["method=fastv", "method.params.keep=null,10", "budget.kind=tokens", "budget.value=0.5"],
                ["method=random", "method.params.seed=0,-1"], ["method=fastv,random", "method.params.keep=1,0"],
                ["method=shortv", "method.params.layers=auto", "method.params.N=2", "calibration.n=40,100000000"],
                ["method=fastv,shortv_auto", "budget.kind=tokens", "budget.value=0.5", "calibration.dir=/etc/hostname"]):
        rc = run_multirun(args + bad)
        line = one_line_error(capsys, rc)
        assert "=" in line, line
    nothing_written(tmp_path / "store")
    assert not (tmp_path / "hydra").exists()


def test_experiment_sweeper_params_are_validated_on_the_meta_device(tmp_path, capsys, monkeypatch):
    """An experiment's `hydra.sweeper.params` cells (ShortV N=8,16,19 x 7 benchmarks) on a 12-layer
    variant of the architecture: N=16 and 19 freeze more layers than it has, found before any cell."""
    from harness.sweep import run_multirun

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    rc = run_multirun(["experiment=repro_shortv_nsweep_llava15_7b", "run.device=cpu", "logger=none",
                       f"store.dir={tmp_path / 'store'}", "model.arch.text_config.num_hidden_layers=12"])
    line = one_line_error(capsys, rc)
    assert "shortv" in line, line
    nothing_written(tmp_path / "store")


def test_sweep_validation_builds_one_meta_model_per_model_config(monkeypatch):
    import harness.models.checkpoint as checkpoint
    import harness.models.loading as loading
    from harness.sweep import validate_sweep

    calls = []
    real = loading.meta_adapter
    monkeypatch.setattr(loading, "meta_adapter", lambda m: calls.append(m.name) or real(m))
    monkeypatch.setattr(checkpoint, "check_available", lambda m: None)
    cells = validate_sweep(["method=fastv", "method.params.K=1,2,3", "run.seed=0,1"])
    assert len(cells) == 6 and calls == ["tiny"]
    calls.clear()
    cells = validate_sweep(["model=tiny,llava15_7b", "method=fastv", "method.params.K=1,2,3"])
    assert len(cells) == 6 and sorted(calls) == ["llava15_7b", "tiny"]


@pytest.mark.slow
def test_sweep_whose_cells_all_fail_exits_1_naming_them(args, tmp_path, capsys, monkeypatch):
    from harness.sweep import run_multirun

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    _every_generation_fails(monkeypatch)
    rc = run_multirun(args + ["method=none,random", "run.seed=0,1"])
    err = capsys.readouterr().err
    assert rc == 1, err[-2000:]
    last = helper_lines(err)[-1]
    assert last.startswith("vtbench: 4 of 4 cells failed"), last
    for cell in ("method=none run.seed=0", "method=none run.seed=1", "method=random run.seed=0",
                 "method=random run.seed=1"):
        assert f"[{cell}]" in last, last
    assert "all 3 samples failed" in last
    # fixed: the same command completes and exits 0
    monkeypatch.undo()
    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    assert run_multirun(args + ["method=none,random", "run.seed=0,1"]) == 0


# ---- SIGTERM ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("multirun", [False, True])
def test_sigterm_is_like_ctrl_c_and_the_cell_resumes(tiny_checkpoint, data_dir, tmp_path, multirun):
    """What SLURM sends on a time-out or pre-emption: one line, exit 143, answers kept; the rerun resumes
    and ends with the record of an uninterrupted run."""
    store = tmp_path / "store"
    cell = cell_args(tiny_checkpoint, data_dir, store, limit=12)
    argv = (["-m"] if multirun else []) + cell
    proc = start(argv, tmp_path)
    assert kill_when(proc, lambda: progress(store)[1] >= 2, sig=signal.SIGTERM), proc.err[-2000:]
    assert proc.returncode == 143, proc.err[-2000:]
    lines = helper_lines(proc.err)
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0], proc.err[-2000:]
    assert "Traceback" not in proc.err
    n_rec, n_part = progress(store)
    assert n_rec == 0 and n_part >= 2
    again = subprocess.run([str(BIN / "vtbench"), *argv], env=env_for(tmp_path), cwd=str(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    (rec,) = records(store).values()
    assert rec["status"] == "complete" and rec["n_resumed"] >= 2 and rec["n_samples"] == 12


# ---- every console script ---------------------------------------------------------------------------------
SCRIPT_CASES = [
    ("vtbench", ["method=fastv", "method.params.R=abc"], "method.params.R=abc"),
    ("vtbench", ["-m", "method=fastv", "method.params.K=2,8"], "K=8"),
    ("vtbench", ["+run.typo=5"], "run.typo=5"),
    ("vtbench-flops", ["method=fastv", "method.params.R=abc"], "method.params.R=abc"),
    ("vtbench-flops", ["method=ficoco_v", "method.params.penalty_scale=nan"], "penalty_scale=nan"),
    ("vtbench-flops", ["text_tokens=nan"], "text_tokens=nan"),
    ("vtbench-flops", ["+run.typo=5"], "run.typo=5"),
    ("vtbench-calibrate", ["method=shortv", "calibration.n=abc"], "calibration.n=abc"),
    ("vtbench-calibrate", ["method=redundancylens", "calibration.alpha=nan"], "calibration.alpha=nan"),
    ("vtbench-prepare", ["benchmark.seed=abc"], "benchmark.seed=abc"),
    ("vtbench-report", ["--formats", "xml"], "--formats"),
    ("vtbench-report", ["--nosuch-option"], "--nosuch-option"),
    ("vtbench-paper", ["--samples", "nan"], "--samples"),
    ("vtbench-paper", ["--threads", "0"], "--threads"),
    ("vtbench-wandb-report", ["--mode", "loud"], "--mode"),
    ("vtbench-bench", ["--repeats", "abc"], "--repeats"),
    ("vtbench-bench", ["--model-arg", "num_layers=nan"], "num_layers=nan"),
    ("vtbench-paper", ["--part", "flops", "--out", "a-file/paper"], "Not a directory"),
]


@pytest.mark.parametrize("script, argv, needle", SCRIPT_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in SCRIPT_CASES])
def test_every_console_script_refuses_bad_values_in_one_line(script, argv, needle, tmp_path):
    store = tmp_path / "store"
    (tmp_path / "a-file").write_text("not a folder")
    extra = [f"store.dir={store}", f"calibration.dir={tmp_path / 'cal'}"] if script in ("vtbench", "vtbench-calibrate") else []
    out = subprocess.run([str(BIN / script), *argv, *extra], env=env_for(tmp_path), cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), out.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out.stderr
    assert not store.exists() and not (tmp_path / "cal").exists() and not (tmp_path / "results").exists()


def test_exit_codes_are_documented_once():
    from harness import errors

    assert (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_BAD_INPUT, errors.EXIT_INTERRUPTED,
            errors.EXIT_TERMINATED) == (0, 1, 2, 130, 128 + signal.SIGTERM)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for code in ("130", "143"):
        assert f"**{code}**" in readme or f"`{code}`" in readme


def test_nan_is_never_a_valid_number():
    """The shared helpers agree with math.isfinite on nested values."""
    from methods import nonfinite

    assert nonfinite(float("nan")) and nonfinite([1, {"a": float("-inf")}]) and not nonfinite([1, 2.5, "x"])
    assert not nonfinite(math.pi)


def test_slurm_sweep_checks_devices_on_the_nodes_and_a_launcher_failure_is_one_line(args, tmp_path, capsys,
                                                                                    monkeypatch):
    """Under a SLURM launcher the login node's devices say nothing about the nodes': `run.device=cuda` passes
    the sweep's validation there (every other check still runs: NaN is still refused). Outside a cluster the
    launcher cannot start: one line, exit 1, no traceback."""
    import shutil

    from harness.sweep import run_multirun

    if shutil.which("srun"):
        pytest.skip("a SLURM cluster: the launcher would really submit")
    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "hydra"))
    slurm = ["hydra/launcher=submitit_slurm", "run.device=cuda", "method=none,random"]
    rc = run_multirun(args + ["hydra/launcher=submitit_slurm", "run.device=cuda", "method=random",
                              "method.params.keep_ratio=0.5,nan"])
    line = one_line_error(capsys, rc)
    assert "keep_ratio=nan" in line and "finite" in line, line
    rc = run_multirun(args + slurm)
    line = one_line_error(capsys, rc, code=1)
    assert "the sweep could not run" in line and "srun" in line, line
    nothing_written(tmp_path / "store")
