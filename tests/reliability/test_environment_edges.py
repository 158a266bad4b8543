"""The environment's edges (issue 32, points 6-9): reports written all or nothing on a full disk, any number
of interrupting signals, environment variables resolved lazily and named when at fault, a moved read-only data
folder, and the smaller cases (error keys, unreachable budgets, VTBENCH_STORE)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.cli.main import run_one
from tests.records import make_record

pytestmark = pytest.mark.bad_input


def _lines(err: str, prog: str = "vtbench") -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"{prog}:")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    """The disk fills up after `n_ok` more files: the next fsync cuts the file at 4096 bytes and fails with
    ENOSPC (as a full file system does when the data reach the disk)."""
    real = os.fsync
    state = {"n": 0}

    def fsync(fd):
        state["n"] += 1
        if state["n"] > n_ok:
            os.truncate(os.readlink(f"/proc/self/fd/{fd}"), min(4096, os.fstat(fd).st_size // 2))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ---- 6. every file written for a user: atomic, all or nothing, the path named -----------------------------
@pytest.fixture
def report_store(tmp_path):
    from harness.results import ResultsStore

    store = ResultsStore(tmp_path / "store")
    for split in ("test", "val"):
        store.write(make_record("none", (1.0, 1.0, 0.0, 1.0), split=split, flops=4e9))
        store.write(make_record("fastv", (1.0, 0.0, 0.0, 1.0), split=split, flops=2e9, params={"R": 0.5}))
    return store


@pytest.mark.parametrize("n_ok", [0, 1, 3, 5])  # the disk fills up before the first, second, fourth, last file
def test_report_on_a_full_disk_leaves_the_previous_tables_byte_identical(report_store, tmp_path, capsys, monkeypatch,
                                                                        n_ok):
    from harness.cli import report as report_cli

    out = tmp_path / "out"
    args = ["--store", str(report_store.root), "--out", str(out), "--no-figures"]
    assert report_cli.main(args) == 0
    before = _files(out)
    assert len(before) == 6  # two groups x md/csv/tex
    report_store.write(make_record("fastv", (0.0, 0.0, 0.0, 1.0), flops=1e9, params={"R": 0.75}))  # new content
    capsys.readouterr()
    _disk_full_after(monkeypatch, n_ok)
    rc = report_cli.main(args)
    err = capsys.readouterr().err
    lines = _lines(err, "vtbench-report")
    assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert str(out / "tables") in lines[0] and "Traceback" not in err
    assert _files(out) == before  # byte-identical, no temporary file left
    monkeypatch.undo()
    assert report_cli.main(args) == 0 and _files(out) != before  # space again: the new report


@pytest.mark.slow  # matplotlib: seconds
def test_report_figures_are_part_of_the_all_or_nothing(report_store, tmp_path, capsys, monkeypatch):
    from harness.cli import report as report_cli

    out = tmp_path / "out"
    args = ["--store", str(report_store.root), "--out", str(out), "--formats", "md"]
    assert report_cli.main(args) == 0
    before = _files(out)
    assert any(k.endswith(".png") for k in before) and any(k.endswith(".pdf") for k in before)
    report_store.write(make_record("fastv", (0.0, 0.0, 0.0, 1.0), flops=1e9, params={"R": 0.75}))
    _disk_full_after(monkeypatch, 3)  # the tables of the first group, then a figure
    assert report_cli.main(args) == 2
    assert _files(out) == before


def test_paper_tables_and_bench_reports_are_written_all_or_nothing(tmp_path, monkeypatch):
    """The class: the paper's FLOPs tables and a bench report go through the same writer (one file failing
    leaves every previous file as it was), and an error names the path."""
    import importlib

    from harness import paper

    bench_render = importlib.import_module("harness.bench.render")

    monkeypatch.setattr(paper, "TABLES", {f"t{i}": (f"T{i}", "c", lambda: []) for i in range(3)})
    writers = {"paper": (tmp_path / "paper", lambda d: paper.write_flops(d)),
               "bench": (tmp_path / "bench", lambda d: bench_render.write_report({"methods": {"rows": []}}, d / "m1"))}
    monkeypatch.setattr(bench_render, "render", lambda res: "# report\n")
    for name, (folder, write) in writers.items():
        write(folder)
        for p in folder.rglob("*"):
            p.write_text("previous " + p.name)
        before = _files(folder)
        for n_ok in range(len(before)):
            with monkeypatch.context() as m:
                _disk_full_after(m, n_ok)
                with pytest.raises(OSError) as e:
                    write(folder)
            assert e.value.errno == errno.ENOSPC and str(folder) in str(e.value.filename), (name, e.value)
            assert _files(folder) == before, name
        write(folder)
        assert _files(folder) != before and set(_files(folder)) == set(before)


def test_atomic_write_never_leaves_a_cut_file(tmp_path, monkeypatch):
    from harness.paths import atomic_write

    target = tmp_path / "table.md"
    atomic_write(target, "old\n")
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(OSError) as e:
        atomic_write(target, "x" * 10000)
    assert e.value.filename == str(target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


# ---- 7. any number of SIGINT / SIGTERM: one line, the documented exit code ---------------------------------
_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from harness.errors import install_signal_handlers, interrupted
    install_signal_handlers("vtbench")
    first, then, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    try:
        os.kill(os.getpid(), first)
        time.sleep(5)
    except KeyboardInterrupt as e:
        # the clean-up after the first signal (e.g. saving .hydra/) is hit by `n` more signals, 50 ms apart
        for _ in range(n):
            os.kill(os.getpid(), then)
            time.sleep(0.05)
        sys.exit(interrupted("vtbench", e))
""")


@pytest.mark.parametrize("first, then", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                                         (signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
@pytest.mark.parametrize("more", [1, 4])
def test_repeated_signals_give_one_line_and_the_first_signals_exit_code(first, then, more):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(int(first)), str(int(then)), str(more)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == (143 if first == signal.SIGTERM else 130), p.stderr
    assert len(_lines(p.stderr)) == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_twice_during_a_cell(tiny_checkpoint, data_dir, tmp_path, sig):
    """End to end: two signals 50 ms apart while a cell answers: one line, 130/143, no traceback, and the
    answers given so far are on disk (the same command resumes)."""
    import time

    from tests.reliability.helpers import cell_args, progress, start

    store = tmp_path / "store"
    proc = start(cell_args(tiny_checkpoint, data_dir, store, limit=40), tmp_path)
    t0 = time.monotonic()
    while progress(store)[1] < 2 and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.02)
    proc.send_signal(sig)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-3000:]
    assert len(_lines(err)) == 1 and "Traceback" not in err, err[-3000:]
    assert progress(store)[1] >= 2


# ---- 8. the environment -------------------------------------------------------------------------------------
def test_config_defaults_read_the_environment_lazily(monkeypatch, tmp_path):
    """HOME unset with VTBENCH_DATA set composes and validates; no default of conf/ reads a second variable
    eagerly (`${oc.env:A,${oc.env:B}...}` resolves B even when A is set)."""
    import re

    from harness.config import CONF_DIR, compose_config, validate

    for f in CONF_DIR.rglob("*.yaml"):
        for m in re.finditer(r"\$\{oc\.env:[^,}]+,(\$\{)?", f.read_text()):
            assert m.group(1) is None, f"{f}: a default that resolves another interpolation eagerly: {m.group(0)}"
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("VTBENCH_DATA", str(tmp_path / "data"))
    cfg = compose_config(["logger=none"])
    assert cfg.data_dir == str(tmp_path / "data")
    validate(cfg)
    monkeypatch.delenv("VTBENCH_DATA")
    cfg = compose_config(["logger=none"])  # the default still composes: `~` is expanded when used
    assert cfg.data_dir == "~/.cache/vtbench/data"


@pytest.mark.parametrize("var", ["HOME", pytest.param("HF_HOME", marks=pytest.mark.slow), "HF_DATASETS_CACHE"])
def test_an_unwritable_datasets_cache_is_named_not_called_offline(var, tiny_checkpoint, data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    import datasets  # noqa: F401 - these read their cache folders when imported: not from this test's environment
    import huggingface_hub  # noqa: F401
    import transformers  # noqa: F401

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for v in ("HF_HOME", "HF_DATASETS_CACHE", "LMMS_EVAL_DATASETS_CACHE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, str(blocker / "sub"))
    rc = run_one([f"model.pretrained={tiny_checkpoint}", f"data_dir={data_dir}", f"store.dir={tmp_path / 'store'}",
                  "logger=none", "run.limit=2", "run.efficiency.enabled=false"])
    err = capsys.readouterr().err
    lines = _lines(err)
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert var in lines[0] and str(blocker) in lines[0] and "offline" not in lines[0], lines[0]


@pytest.fixture
def file_in_the_way(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("where", ["file", "under a file", "empty"])
@pytest.mark.parametrize("sweep", [False, True])
def test_vtbench_outputs_that_cannot_be_a_folder_is_bad_input(where, sweep, file_in_the_way, data_dir, tmp_path,
                                                             capsys, monkeypatch):
    from harness.sweep import run_multirun

    value = {"file": str(file_in_the_way), "under a file": str(file_in_the_way / "outputs"), "empty": ""}[where]
    monkeypatch.setenv("VTBENCH_OUTPUTS", value)
    args = [f"data_dir={data_dir}", f"store.dir={tmp_path / 'store'}", "logger=none", "run.limit=2"]
    rc = run_multirun(args + ["run.seed=0,1"]) if sweep else run_one(args)
    err = capsys.readouterr().err
    lines = _lines(err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"vtbench: error: VTBENCH_OUTPUTS={value}:"), err[-2000:]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("script", ["report", "wandb_report"])
@pytest.mark.parametrize("where", ["file", "empty", "missing"])
def test_vtbench_store_that_is_not_a_folder_is_bad_input(script, where, file_in_the_way, tmp_path, capsys,
                                                         monkeypatch):
    import importlib

    value = {"file": str(file_in_the_way), "empty": "", "missing": str(tmp_path / "nope")}[where]
    monkeypatch.setenv("VTBENCH_STORE", value)
    prog = "vtbench-" + script.replace("_", "-")
    rc = importlib.import_module(f"harness.cli.{script}").main(["--out", str(tmp_path / "out")]
                                                              if script == "report" else [])
    err = capsys.readouterr().err
    lines = _lines(err, prog)
    assert rc == 2 and len(lines) == 1 and "VTBENCH_STORE=" in lines[0], err[-2000:]
    assert "no complete records" not in err


@pytest.mark.slow  # generates a second data folder and runs a cell
def test_a_moved_read_only_shapes_folder_works_as_it_is(tiny_checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    """The task files name their data relative to themselves: a data folder copied or moved elsewhere and
    read-only (nothing may be rewritten) is evaluated as it is."""
    import harness.benchmarks.prepare as prepare

    src = tmp_path / "made-here"
    prepare.prepare_shapes(src)
    moved = tmp_path / "moved" / "data"
    moved.parent.mkdir()
    shutil.move(str(src), str(moved))
    for y in (moved / "shapes-seed0").glob("*.yaml"):
        assert str(tmp_path) not in y.read_text()

    def read_only(path, text):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(prepare, "_atomic_write", read_only)
    before = _files(moved)
    rc = run_one([f"model.pretrained={tiny_checkpoint}", f"data_dir={moved}", f"store.dir={tmp_path / 'store'}",
                  "logger=none", "run.limit=2", "run.efficiency.enabled=false"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert _files(moved) == before


# ---- 9. smaller ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message, key", [
    ({"r": 1000, "tokens": None}, "tome: layer 0 would merge 1000 tokens but ... (lower r / raise tokens)", "r=1000"),
    ({"r": None, "tokens": 9}, "tome: tokens=9 leaves fewer than r tokens", "tokens=9"),
    ({"K": 3, "R": 0.5}, "fastv: R must be below 1 for K", "R=0.5"),
    ({"K": 9, "keep": None}, "fastv: keep must be set when K=9 is used", "K=9"),
])
def test_a_method_error_is_led_by_the_parameter_it_is_about(params, message, key):
    """The key leading a method's error: one the message writes as `key=`, else the first named one that is
    set (a null parameter named in advice is not what was wrong), else the first named."""
    from methods import keyed

    name = message.split(":")[0]
    assert keyed(name, params, message).startswith(f"method.params.{key}: {message}")


def test_tome_r_too_large_is_led_by_r(capsys, tmp_path):
    rc = run_one(["method=tome", "method.params.r=1000", "logger=none", f"store.dir={tmp_path / 'store'}"])
    line = _lines(capsys.readouterr().err)
    assert rc == 2 and len(line) == 1 and line[0].startswith("vtbench: error: method.params.r=1000:"), line


@pytest.mark.parametrize("method, value, warns", [("shortv_fastv", 0.01, True), ("fastv", 0.01, True),
                                                  ("shortv", 0.05, True), ("fastv", 0.8, False)])
def test_an_unreachable_flops_budget_warns_with_the_ratio_it_reaches(method, value, warns, data_dir, tmp_path, capsys,
                                                                      monkeypatch):
    """As the report flags such a row (harness.budget.budget_note, one rule), the run warns before the model
    loads, naming the budget and the ratio the closest setting costs; a reachable budget says nothing."""
    import harness.benchmarks.prepare as prepare
    from harness.benchmarks.prepare import BenchmarkDataError

    def stop(*a, **k):  # the warning comes before the data are prepared: stop there
        raise BenchmarkDataError("stopped by the test")

    monkeypatch.setattr(prepare, "prepare", stop)
    run_one([f"data_dir={data_dir}", f"store.dir={tmp_path / 'store'}", "logger=none", f"method={method}",
             "budget.kind=flops", f"budget.value={value}"])  # the built-in tiny LLaVA (8 LLM layers)
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "not reachable" in ln]
    if warns:
        import re

        assert len(warning) == 1 and f"budget.value={value}" in warning[0], err[-2000:]
        assert re.search(r"costs [01]\.\d\d", warning[0]) and "vtbench: error: stopped by the test" in err
    else:
        assert not warning, warning
