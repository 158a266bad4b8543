"""The local results store: one JSON record per evaluation cell, read back with pandas.

Layout under the store directory:

    records/<key>.json     one complete (or failed) cell; written atomically (temp file + fsync +
                           os.replace), so a reader never sees half a record
    partial/<key>.jsonl    per-sample answers of a cell in progress (appended per batch); a killed
                           cell resumes from it; removed when the record is written
    locks/<key>.lock       advisory lock (filelock: flock on Unix) held by the one process evaluating the cell; the
                           kernel releases it when that process dies, even by SIGKILL

The key is the hash of the cell identity (`cell_identity`): everything that changes a cell's answers
or what it measures -- the resolved settings, the content of a local checkpoint's files or a hub
revision's commit, the calibration behind 'auto' layers, the answer-relevant package versions. Every
file is validated when read (`harness.schema`): a record that is malformed or does not belong to its
key is named and ignored (the cell is evaluated again), a bad partial line is dropped (that sample is
answered again), and a partial file written for other code or another identity is discarded. JSON
only, written strictly (no NaN/Infinity); nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.schema import (RECORD_SCHEMA, PartialHeader, PartialRow, SchemaError, dumps_sealed, dumps_strict,
                            identity_hash, loads_sealed, parse_partial_line, validate_record)

SCHEMA = 2

#: packages whose version changes answers (kernels, model code, task definitions)
ANSWER_PACKAGES = ("vtbench", "torch", "transformers", "lmms_eval")


class StoreError(RuntimeError):
    """The store cannot be written (permissions, full disk); one line."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _device_type(device: str | None) -> str:
    d = str(device or "cpu")
    if d == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return d.split(":", 1)[0]


def model_source(model: dict) -> dict:
    """What a model's files are: a local folder's content digest, or a hub revision's commit."""
    from harness.fingerprint import folder_digest, hub_commit
    from harness.models.loading import ModelLoadError, resolve_pretrained

    try:
        path, is_local = resolve_pretrained(str(model["pretrained"]))
    except ModelLoadError:
        return {"checkpoint_sha256": None}  # missing: the loader refuses it in one line
    if is_local:
        return {"checkpoint_sha256": folder_digest(path)["sha256"]}
    return {"commit": hub_commit(path, model.get("revision"))}


def cell_identity(cfg: dict) -> dict:
    """Everything that changes a cell's answers or what it measures, and nothing else (store paths,
    loggers, device indices excluded). See README "Failure behaviour" for the list."""
    import methods as registry
    from harness.environment import versions

    model, method, bench, run = cfg["model"], cfg["method"], cfg["benchmark"], cfg["run"]
    params = method.get("params") or {}
    try:  # a parameter added later, at the value that reproduces the earlier behaviour, keeps old keys
        from methods.base import identity_params

        params = identity_params(registry.get(method["name"]), dict(params))
    except registry.MethodError:
        pass  # an unknown method is refused elsewhere, in one line
    ident = {
        "schema": SCHEMA,
        "model": {
            "name": model["name"],
            "pretrained": model["pretrained"],
            "revision": model.get("revision"),
            "dtype": run.get("dtype") or model["dtype"],
            "attn_implementation": model["attn_implementation"],
            "trust_remote_code": bool(model.get("trust_remote_code", False)),
            **model_source(model),
        },
        "method": {"name": method["name"], "params": params},
        "budget": _budget(cfg.get("budget")),
        "calibration": _calibration(cfg, registry, method["name"], params),
        "benchmark": {
            "name": bench["name"],
            "task": bench["task"],
            "split": bench.get("split"),
            "seed": bench.get("seed"),
            **_bench_source(bench),
        },
        "limit": run.get("limit"),
        "seed": run["seed"],
        "batch_size": run["batch_size"],
        "max_new_tokens": run.get("max_new_tokens"),
        "device": _device_type(run.get("device")),
        # a record with efficiency figures and one without are different measurements: forcing one
        # never replaces the other
        "efficiency": bool((run.get("efficiency") or {}).get("enabled", True)),
        "software": versions(ANSWER_PACKAGES),
    }
    # a custom prompt template changes every answer
    if model.get("chat_template"):
        ident["model"]["chat_template_sha256"] = hashlib.sha256(model["chat_template"].encode()).hexdigest()[:16]
    return ident


def _bench_source(bench: dict) -> dict:
    if bench.get("builtin"):
        from harness.benchmarks.shapes import GENERATOR_VERSION

        return {"generator_version": GENERATOR_VERSION}  # the data are checked against the generator
    if bench.get("include_path"):
        from harness.fingerprint import folder_digest, TASK_FILES

        return {"task_files_sha256": folder_digest(bench["include_path"], TASK_FILES, "task files")["sha256"]}
    return {}


def _budget(budget: dict | None) -> dict | None:
    """The budget of a cell, its value in one spelling per meaning: a share (<= 1) as a float, a count (> 1)
    as an int, so `budget.value=64.0` and `64` (or `1` and `1.0`) are one cell, not two."""
    if not budget or budget.get("kind") is None:
        return None
    value = budget["value"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = int(value) if value > 1 and float(value).is_integer() else float(value) if value <= 1 else value
    return {"kind": budget["kind"], "value": value, "text_tokens": budget.get("text_tokens")}


def _calibration(cfg: dict, registry, name: str, params: dict) -> dict | None:
    """The calibration behind a cell: its data settings whenever the method may take layers from a
    calibration artefact ('auto' given, or set by a budget), and the content of artefacts given by path."""
    try:
        cls = registry.get(name)
    except Exception:
        return None
    if not cls.may_calibrate(params):
        return None
    given = cls.calibration_given(params)
    uses_auto = "auto" in json.dumps(params) or bool(_budget(cfg.get("budget")))
    if not given and not uses_auto:
        return None
    from harness.fingerprint import file_digest

    cal = cfg.get("calibration") or {}
    out = {k: cal.get(k) for k in ("benchmark", "split", "n", "seed", "batch_size", "tail", "alpha")} if uses_auto else {}
    for f, path in sorted(given.items()):
        try:
            out[f"{f}_sha256"] = file_digest(path)
        except OSError:
            out[f"{f}_sha256"] = None  # missing: the method refuses it in one line
    return out


def record_key(cfg: dict) -> str:
    return identity_hash(cell_identity(cfg))


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + fsync + `os.replace` (`harness.paths.atomic_write`, the one atomic writer)."""
    from harness.paths import atomic_write

    atomic_write(path, text)


class ResultsStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(str(root)))
        self.records = self.root / "records"
        self.partial = self.root / "partial"
        self.locks = self.root / "locks"
        self._warned: set[str] = set()  # invalid record files already named (one warning per file)

    # ---- checks ------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail early (one line) if records cannot be written here."""
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            self.partial.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.records, prefix=".probe.")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise StoreError(f"results store {self.root} is not writable: {e.strerror or e}") from None

    # ---- records -----------------------------------------------------------------------------------
    def record_path(self, key: str) -> Path:
        return self.records / f"{key}.json"

    def read(self, path: Path) -> dict:
        """A validated record file: sealed JSON (`harness.schema.loads_sealed`) that is a well-formed,
        self-consistent record of its file name's key; raises SchemaError (one line) for anything else."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SchemaError(f"unreadable: {e.strerror or e}") from None
        return validate_record(loads_sealed(data), path.stem)

    def get(self, key: str) -> dict | None:
        """The record of `key`, or None if absent. A file that is not a valid record of `key` is named
        on stderr (once per store object) and treated as absent, so the cell is evaluated again (and the
        file replaced)."""
        p = self.record_path(key)
        if not p.is_file():
            return None
        try:
            return self.read(p)
        except SchemaError as e:
            if str(p) not in self._warned:
                self._warned.add(str(p))
                print(f"[vtbench] warning: ignoring invalid record {p} ({e}); the cell is evaluated again",
                      file=sys.stderr, flush=True)
            return None

    def is_complete(self, key: str) -> bool:
        rec = self.get(key)
        return bool(rec) and rec.get("status") == "complete"

    def write(self, record: dict) -> Path:
        key = record["key"]
        path = self.record_path(key)
        text = dumps_sealed({**record, "schema": RECORD_SCHEMA}, indent=1)
        validate_record(loads_sealed(text), key)  # never write what no reader would accept
        try:
            atomic_write_text(path, text)
        except OSError as e:
            raise StoreError(f"cannot write record {path}: {e.strerror or e}") from None
        self._warned.discard(str(path))
        self.clear_partial(key)
        return path

    def iter_records(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Yield `(path, record, error)`; invalid files come with record None and a one-line error."""
        if not self.records.is_dir():
            return
        for p in sorted(self.records.glob("*.json")):
            try:
                yield p, self.read(p), None
            except SchemaError as e:
                yield p, None, str(e)

    # ---- one evaluator per cell -------------------------------------------------------------------
    @contextmanager
    def cell_lock(self, key: str):
        """Hold the cell's lock while evaluating it, so two processes sharing the store (two sweeps)
        never evaluate the same cell at once nor interleave its partial answers; a second process
        waits, then finds the complete record. The lock is an OS file lock (`filelock`, flock on Unix)
        that the kernel releases when the holder dies (SIGKILL included): it is never stale. Under the
        lock, debris of a killed earlier attempt (a torn last partial line, a temp file of an unfinished
        record write) is cleaned up."""
        from filelock import FileLock, Timeout

        path = self.locks / f"{key}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the kernel lock only (no soft-lock fallback, which a killed holder would leave stale); the lock
            # file is kept, so two waiters never lock two different inodes of one path
            lock = FileLock(path, is_singleton=False, fallback_to_soft=False, preserve_lock_file=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                print(f"[vtbench] cell {key} is being evaluated by another process: waiting for it",
                      file=sys.stderr, flush=True)
                lock.acquire()
        except OSError as e:
            raise StoreError(f"cannot create lock {path}: {e.strerror or e}") from None
        try:
            self._clean_debris(key)
            yield
        finally:
            lock.release()

    def _clean_debris(self, key: str) -> None:
        for tmp in self.records.glob(f".{key}.json.*.tmp"):
            tmp.unlink(missing_ok=True)
        p = self.partial_path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):  # killed mid-append: drop the torn tail
            with open(p, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    # ---- per-sample progress ---------------------------------------------------------------------
    # partial/<key>.jsonl: a header line {"vtbench_partial": 1, "key", "code"} naming the cell and the
    # code that produced the answers, then one PartialRow per answered sample
    def partial_path(self, key: str) -> Path:
        return self.partial / f"{key}.jsonl"

    def _partial_rows(self, key: str, code: str | None = None) -> list[PartialRow]:
        p = self.partial_path(key)
        try:
            lines = p.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"cannot read progress {p}: {e.strerror or e}") from None
        header = parse_partial_line(lines[0], PartialHeader) if lines else None
        if header is None or header.key != key or (code is not None and header.code != code):
            why = ("was written by other vtbench code" if header is not None and header.key == key
                   else "has no valid header")
            print(f"[vtbench] warning: discarding {p}: it {why}; its samples are evaluated again",
                  file=sys.stderr, flush=True)
            p.unlink(missing_ok=True)
            return []
        rows, bad = [], 0
        for line in lines[1:]:
            if not line.strip():
                continue
            row = parse_partial_line(line)
            if row is None:
                bad += 1
            else:
                rows.append(row)
        if bad:
            print(f"[vtbench] warning: dropped {bad} invalid line(s) of {p}; those samples are evaluated again",
                  file=sys.stderr, flush=True)
        return rows

    def load_partial(self, key: str, code: str | None = None) -> dict[tuple[str, str, int], PartialRow]:
        """Answers already produced for a cell in progress, by (task, split, doc_id); a torn, undecodable
        or wrongly typed line is dropped, and a file of other code (`code`) is discarded."""
        return {(r.task, r.split, r.doc_id): r for r in self._partial_rows(key, code)}

    def append_partial(self, key: str, rows: list[tuple], code: str = "") -> None:
        """Append `(task, split, doc_id, answer[, nonfinite[, recall]])` rows (one write, fsynced); a new
        file starts with its header. `recall` is the sample's per-layer asked-cell recall, kept so a resumed
        cell's record equals an uninterrupted one."""
        p = self.partial_path(key)
        lines = []
        for t, s, d, a, *extra in rows:
            nonfinite = bool(extra[0]) if extra else False
            recall = [None if x is None else float(x) for x in extra[1]] if len(extra) > 1 and extra[1] is not None else None
            row = PartialRow(task=str(t), split=str(s), doc_id=int(d), answer=str(a), nonfinite=nonfinite,
                             recall=recall)
            lines.append(dumps_strict(row.model_dump(exclude_defaults=True)) + "\n")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size == 0:
                    lines.insert(0, dumps_strict({"vtbench_partial": 1, "key": key, "code": code}) + "\n")
                buf = memoryview("".join(lines).encode())
                while buf:
                    buf = buf[os.write(fd, buf):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"cannot write progress {p}: {e.strerror or e}") from None

    def clear_partial(self, key: str) -> None:
        try:
            self.partial_path(key).unlink()
        except FileNotFoundError:
            pass


def _flatten(prefix: str, obj: Any, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj


#: what may differ between the cells of one comparison (everything else of the identity must be equal)
COMPARED = ("method", "budget", "calibration", "efficiency")


def comparison_group(cell: dict) -> dict:
    """The part of a cell identity that must be equal for two cells to be compared (split, batch size,
    generation length, dtype, attention backend, data seed, weights, template, software, ...)."""
    return {k: v for k, v in cell.items() if k not in COMPARED}


def _method_label(method: dict) -> str | None:
    """The method column: the registry name, a composition's members joined (`shortv+fastv`)."""
    import methods

    name = method.get("name")
    return methods.label(name, method.get("params")) if name else name


def record_row(rec: dict) -> dict:
    """One flat row of a record (per-sample predictions left out)."""
    cell = rec.get("cell", {})
    row = {
        "key": rec["key"],
        "group": identity_hash(comparison_group(cell)),
        "split": cell.get("benchmark", {}).get("split"),
        "status": rec.get("status"),
        "model": cell.get("model", {}).get("name"),
        "method": _method_label(cell.get("method", {})),
        "method_params": _canonical(rec.get("method_params") or cell.get("method", {}).get("params", {})),
        "budget": _canonical(cell.get("budget")) if cell.get("budget") else None,
        "benchmark": cell.get("benchmark", {}).get("name"),
        "limit": cell.get("limit"),
        "seed": cell.get("seed"),
        "batch_size": cell.get("batch_size"),
        "primary_metric": rec.get("primary_metric"),
        "accuracy": rec.get("accuracy"),
        "n_samples": rec.get("n_samples"),
        "n_failed": rec.get("n_failed"),
        "n_empty": rec.get("n_empty"),
        "n_nonfinite": rec.get("n_nonfinite"),
        "error": rec.get("error"),
        "created": rec.get("created"),
    }
    if isinstance(rec.get("asked_recall"), dict):  # shapes: asked-cell recall (harness/recall.py)
        row["asked_recall"] = rec["asked_recall"].get("mean")
    for section in ("metrics", "efficiency"):
        flat: dict = {}
        _flatten("", rec.get(section) or {}, flat)
        for k, v in flat.items():
            if not isinstance(v, (list, tuple)):
                row[f"{section}.{k}"] = v
    return row


def load(store_dir: str | os.PathLike | None = None, include_failed: bool = False):
    """Records of a store as a pandas DataFrame, one row per cell.

    Corrupt record files are reported (a warning naming each) and excluded, never aggregated; their
    paths are in `df.attrs["corrupt"]`.
    """
    import pandas as pd

    from harness.paths import default_store

    store = ResultsStore(store_dir or default_store())
    rows, corrupt = [], []
    for path, rec, err in store.iter_records():
        if rec is None:
            corrupt.append(str(path))
            warnings.warn(f"vtbench: skipping corrupt record {path}: {err}", stacklevel=2)
            continue
        if rec.get("status") != "complete" and not include_failed:
            continue
        rows.append(record_row(rec))
    df = pd.DataFrame(rows)
    df.attrs["corrupt"] = corrupt
    return df


def load_samples(store_dir: str | os.PathLike, key: str):
    """Per-sample predictions of one record as a DataFrame."""
    import pandas as pd

    rec = ResultsStore(store_dir).get(key)
    if rec is None:
        raise KeyError(f"no record {key} in {store_dir}")
    return pd.DataFrame(rec.get("samples", []))
