"""Hydra's standard flags on `vtbench` (issue 20, item 2): answered by Hydra, with vtbench's one-line
errors for bad input; single runs keep their composed config under `<hydra.run.dir>/.hydra/`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

VTBENCH = os.path.join(os.path.dirname(sys.executable), "vtbench")


def _run(args, tmp_path):
    env = dict(os.environ, VTBENCH_OUTPUTS=str(tmp_path / "outputs"), VTBENCH_STORE=str(tmp_path / "store"))
    return subprocess.run([VTBENCH, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = _run(["--cfg", "job", "method=fastv", "method.params.R=0.25"], tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    from omegaconf import OmegaConf

    from harness.config import compose_config

    want = OmegaConf.to_container(compose_config(["method=fastv", "method.params.R=0.25"]).method)
    assert cfg["method"] == want and want["params"]["R"] == 0.25
    assert "hydra" not in cfg and cfg["model"]["name"] == "tiny"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "store").exists()


def test_cfg_resolve_and_package(tmp_path):
    out = _run(["-c", "job", "--resolve", "--package", "store"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == {"dir": str(tmp_path / "store")}
    out = _run(["--cfg", "hydra"], tmp_path)
    assert out.returncode == 0 and "sweeper" in yaml.safe_load(out.stdout)["hydra"]


def test_shell_completion_and_info(tmp_path):
    out = _run(["-sc", "install=bash"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "complete -o nospace" in out.stdout and "vtbench" in out.stdout
    out = _run(["--info", "defaults"], tmp_path)
    assert out.returncode == 0 and "method/none" in out.stdout, out.stderr
    out = _run(["--hydra-help"], tmp_path)
    assert out.returncode == 0 and "Hydra" in out.stdout


@pytest.mark.bad_input
@pytest.mark.parametrize("args, needle", [
    (["--cfg", "job", "method=nosuch"], "unknown method 'nosuch'"),
    (["--cfg", "job", "+run.typo=1"], "run.typo=1"),
    (["--cfg", "bogus"], "--cfg"),
    (["--resolve"], "--resolve"),
    (["--package", "run"], "--package"),
    (["--cfg", "job", "-m", "method=none"], "-m"),
])
def test_bad_hydra_flags_are_one_line(args, needle, tmp_path):
    out = _run(args, tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vtbench: error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_single_run_saves_its_config_under_hydra_dir(cell_overrides, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from harness.cli.main import run_one
    from harness.config import compose_config

    monkeypatch.setenv("VTBENCH_OUTPUTS", str(tmp_path / "outputs"))
    assert run_one(["run.limit=abc", *cell_overrides[:-2]]) == 2  # bad input: nothing saved
    assert not (tmp_path / "outputs").exists()
    assert run_one(cell_overrides) == 0
    (hydra_dir,) = list((tmp_path / "outputs").glob("*/*/.hydra"))
    assert sorted(p.name for p in hydra_dir.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert OmegaConf.load(hydra_dir / "config.yaml") == compose_config(cell_overrides)
    assert list(OmegaConf.load(hydra_dir / "overrides.yaml")) == cell_overrides
    assert f"composed config saved under {hydra_dir}" in capsys.readouterr().err
