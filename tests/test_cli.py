"""The `vtbench` command: bad input ends in one line, exit code 2, nothing written, quickly."""
import os
import subprocess
import sys
import time

import pytest

VTBENCH = os.path.join(os.path.dirname(sys.executable), "vtbench")


def _run(args, tmp_path, timeout=60):
    t = time.perf_counter()
    out = subprocess.run([VTBENCH, *args, f"store.dir={tmp_path / 'store'}"] if "-h" not in args else [VTBENCH, *args],
                         capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return out, time.perf_counter() - t


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "args, message",
    [
        (["model=nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["method=nosuchmethod"], "unknown method 'nosuchmethod'"),
        (["benchmark=nosuchbench"], "unknown benchmark 'nosuchbench'"),
        (["run.limit=many"], "run.limit must be a positive integer"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(args, message, tmp_path):
    out, seconds = _run(args, tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert seconds < 10
    assert not (tmp_path / "store").exists()


@pytest.mark.bad_input
def test_missing_local_checkpoint(tmp_path):
    out, _ = _run([f"model.pretrained={tmp_path / 'nope'}"], tmp_path)
    assert out.returncode == 2
    assert "local checkpoint" in out.stderr and "not found" in out.stderr
    assert not list((tmp_path / "store").glob("records/*.json")) if (tmp_path / "store").exists() else True


@pytest.mark.slow
@pytest.mark.bad_input
def test_hub_id_while_offline(tmp_path):
    out, seconds = _run(["model=llava15_7b"], tmp_path)
    assert out.returncode == 2
    assert "HF_HUB_OFFLINE=1" in out.stderr and "llava-hf/llava-1.5-7b-hf" in out.stderr
    assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) == 1


def test_help_lists_groups(tmp_path):
    out, _ = _run(["--help"], tmp_path)
    assert out.returncode == 0 and "method=" in out.stdout and "shapes" in out.stdout


@pytest.mark.slow  # four vtbench subprocesses
@pytest.mark.bad_input
@pytest.mark.parametrize("sweep", [False, True])
@pytest.mark.parametrize("where", ["afile", "afile/sub"])
def test_unusable_wandb_dir_is_bad_input_before_the_model_loads(where, sweep, tmp_path):
    (tmp_path / "afile").write_text("x")
    args = ["model=tiny", "logger=wandb", "logger.mode=offline", f"logger.dir={tmp_path / where}", "run.limit=2"]
    if sweep:
        args = ["-m", *args, "method=none,fastv"]
    env = dict(os.environ, WANDB_MODE="offline")
    t = time.perf_counter()
    out = subprocess.run([VTBENCH, *args, f"store.dir={tmp_path / 'store'}"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("vtbench: error: logger.dir=") and where in lines[0], out.stderr
    assert "Traceback" not in out.stderr and time.perf_counter() - t < 30
    assert not (tmp_path / "store").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.bad_input
def test_hydra_flag_error_has_the_vtbench_prefix(tmp_path):
    out = subprocess.run([VTBENCH, "--cfg", "job", "-p", "nonexist.key"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and out.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("vtbench: error: --package=nonexist.key"), out.stderr
    good = subprocess.run([VTBENCH, "--cfg", "job", "-p", "run"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert good.returncode == 0 and "limit" in good.stdout and good.stderr == "", good.stderr
