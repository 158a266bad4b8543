"""The local results store: one JSON record per evaluation cell, read back with pandas.

Layout under the store directory:

    records/<key>.json     one complete (or failed) cell; written atomically (temp file + fsync +
                           os.replace), so a reader never sees half a record
    partial/<key>.jsonl    per-sample answers of a cell in progress (appended per batch); a killed
                           cell resumes from it; removed when the record is written
    locks/<key>.lock       advisory lock (fcntl.flock) held by the one process evaluating the cell; the
                           kernel releases it when that process dies, even by SIGKILL

The key is a hash of the fully resolved settings that change results (model + revision + dtype +
attention backend, method + params, benchmark + split + data seed, limit, seed, batch size, generation
length). JSON only: nothing is ever unpickled.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA = 1


class StoreError(RuntimeError):
    """The store cannot be written (permissions, full disk); one line."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_identity(cfg: dict) -> dict:
    """The settings that define a cell (and nothing else: paths, loggers and devices excluded)."""
    model, method, bench, run = cfg["model"], cfg["method"], cfg["benchmark"], cfg["run"]
    ident = {
        "schema": SCHEMA,
        "model": {
            "name": model["name"],
            "pretrained": model["pretrained"],
            "revision": model.get("revision"),
            "dtype": run.get("dtype") or model["dtype"],
            "attn_implementation": model["attn_implementation"],
        },
        "method": {"name": method["name"], "params": method.get("params") or {}},
        "budget": _budget(cfg.get("budget")),
        # 'auto' layer lists are chosen by a calibration run: its data settings change results
        "calibration": _calibration(cfg) if "auto" in json.dumps(method.get("params") or {}) else None,
        "benchmark": {
            "name": bench["name"],
            "task": bench["task"],
            "split": bench.get("split"),
            "seed": bench.get("seed"),
        },
        "limit": run.get("limit"),
        "seed": run["seed"],
        "batch_size": run["batch_size"],
        "max_new_tokens": run.get("max_new_tokens"),
    }
    # a local checkpoint's weights (retraining it must not reuse old records)
    from harness.models.loading import weights_fingerprint

    fp = weights_fingerprint(str(model["pretrained"]))
    if fp:
        ident["model"]["weights_sha256"] = fp
    # a custom prompt template changes every answer: part of the cell (only when set, so existing keys stay)
    if model.get("chat_template"):
        ident["model"]["chat_template_sha256"] = hashlib.sha256(model["chat_template"].encode()).hexdigest()[:16]
    return ident


def _budget(budget: dict | None) -> dict | None:
    if not budget or budget.get("kind") is None:
        return None
    return {"kind": budget["kind"], "value": budget["value"], "text_tokens": budget.get("text_tokens")}


def _calibration(cfg: dict) -> dict | None:
    cal = cfg.get("calibration") or {}
    return {k: cal.get(k) for k in ("benchmark", "split", "n", "seed", "tail", "alpha")}


def record_key(cfg: dict) -> str:
    return hashlib.sha256(_canonical(cell_identity(cfg)).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ResultsStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.expanduser(str(root)))
        self.records = self.root / "records"
        self.partial = self.root / "partial"
        self.locks = self.root / "locks"

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

    def get(self, key: str) -> dict | None:
        """The record of `key`, or None if absent or unreadable."""
        p = self.record_path(key)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec if isinstance(rec, dict) and rec.get("key") == key else None

    def is_complete(self, key: str) -> bool:
        rec = self.get(key)
        return bool(rec) and rec.get("status") == "complete"

    def write(self, record: dict) -> Path:
        key = record["key"]
        path = self.record_path(key)
        try:
            atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False, default=str))
        except OSError as e:
            raise StoreError(f"cannot write record {path}: {e.strerror or e}") from None
        self.clear_partial(key)
        return path

    def iter_records(self) -> Iterator[tuple[Path, dict | None, str | None]]:
        """Yield `(path, record, error)`; corrupt files come with record None and an error."""
        if not self.records.is_dir():
            return
        for p in sorted(self.records.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
                if not isinstance(rec, dict) or "key" not in rec or rec.get("key") != p.stem:
                    raise ValueError("not a vtbench record (missing or mismatched key)")
                yield p, rec, None
            except (OSError, ValueError) as e:
                yield p, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    # ---- one evaluator per cell -------------------------------------------------------------------
    @contextmanager
    def cell_lock(self, key: str):
        """Hold the cell's lock while evaluating it, so two processes sharing the store (two sweeps)
        never evaluate the same cell at once nor interleave its partial answers; a second process
        waits, then finds the complete record. flock is released by the kernel when the holder dies
        (SIGKILL included): a lock is never stale. Under the lock, debris of a killed earlier attempt
        (a torn last partial line, a temp file of an unfinished record write) is cleaned up."""
        path = self.locks / f"{key}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create lock {path}: {e.strerror or e}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"[vtbench] cell {key} is being evaluated by another process: waiting for it",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._clean_debris(key)
            yield
        finally:
            os.close(fd)  # releases the lock

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
    def partial_path(self, key: str) -> Path:
        return self.partial / f"{key}.jsonl"

    def _partial_rows(self, key: str) -> Iterator[dict]:
        p = self.partial_path(key)
        if not p.is_file():
            return
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
                if isinstance(row, dict):
                    yield row
            except ValueError:
                continue

    def load_partial(self, key: str) -> dict[tuple[str, str, int], str]:
        """Answers already produced for a cell in progress (a torn last line is ignored)."""
        out: dict[tuple[str, str, int], str] = {}
        for row in self._partial_rows(key):
            try:
                out[(row["task"], row["split"], int(row["doc_id"]))] = row["answer"]
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def partial_nonfinite(self, key: str) -> set[str]:
        """`task/doc_id` of the partial answers produced with non-finite logits (kept across resumes)."""
        return {f"{r.get('task')}/{r.get('doc_id')}" for r in self._partial_rows(key) if r.get("nonfinite")}

    def append_partial(self, key: str, rows: list[tuple]) -> None:
        """Append `(task, split, doc_id, answer[, nonfinite])` rows (one write, fsynced)."""
        p = self.partial_path(key)
        lines = []
        for t, s, d, a, *flag in rows:
            row = {"task": t, "split": s, "doc_id": int(d), "answer": a}
            if flag and flag[0]:
                row["nonfinite"] = True
            lines.append(json.dumps(row) + "\n")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
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


def record_row(rec: dict) -> dict:
    """One flat row of a record (per-sample predictions left out)."""
    cell = rec.get("cell", {})
    row = {
        "key": rec["key"],
        "status": rec.get("status"),
        "model": cell.get("model", {}).get("name"),
        "method": cell.get("method", {}).get("name"),
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

    store = ResultsStore(store_dir or os.environ.get("VTBENCH_STORE", "runs/store"))
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
