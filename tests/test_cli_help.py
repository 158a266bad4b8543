"""Every console script answers `-h` / `--help` with its usage on stdout and exit 0 (the Hydra-style scripts
`vtbench-calibrate` and `vtbench-prepare` used to read `--help` as a malformed override; `vtbench-flops`
printed its usage as an error, exit 1)."""
from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_is_usage_on_stdout_and_exit_0(script, flag, capsys):
    module, _, _ = SCRIPTS[script].partition(":")
    main = importlib.import_module(module).main
    try:
        rc = main([flag])
    except SystemExit as e:  # argparse's own --help
        rc = e.code
    out, err = capsys.readouterr()
    assert rc in (0, None), (script, rc, err)
    assert script in out or script.replace("-", "_") in out, out[:200]
    assert "error" not in err.lower() and "Traceback" not in err
