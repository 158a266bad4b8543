"""Read W&B offline run files (`run-<id>.wandb`): the transaction log W&B writes (a 7-byte file header,
then 32 KiB blocks of records, each `crc32, length, type` + a slice of a protobuf `Record`)."""
from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += room  # zero padding to the end of the block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def run_files(root, n: int = 1, timeout: float = 30.0) -> list[str]:
    """The offline run files under `root`, waiting (up to `timeout` s) for at least `n` of them and for
    their sizes to settle: W&B's service may still be writing after `run.finish()` returns."""
    import time

    deadline, last = time.monotonic() + timeout, None
    while True:
        files = sorted(glob.glob(os.path.join(str(root), "**", "offline-run-*", "run-*.wandb"), recursive=True))
        sizes = [os.path.getsize(f) for f in files]
        if (len(files) >= n and sizes == last) or time.monotonic() > deadline:
            return files
        last = sizes
        time.sleep(0.5)


def parse(path: str) -> dict:
    """{"run": RunRecord, "config": {key: value}, "summary": {key: value}, "history": [{key: value}]}."""
    run, config, summary, history = None, {}, {}, []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            if kind == "run":
                run = rec.run
            for item in (rec.run.config if kind == "run" else rec.config).update:
                _set(config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "summary":
            for item in rec.summary.update:
                _set(summary, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            history.append(row)
    return {"run": run, "config": config, "summary": summary, "history": history}


def _set(d: dict, keys: list[str], value) -> None:
    """Nested keys (`samples` / `_type`) rebuild the logged object (`{"samples": {"_type": ...}}`)."""
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def artifact_files(path: str, name_suffix: str) -> dict[str, str]:
    """{path in artifact: local staged file} of the (last) artifact whose name ends with `name_suffix`:
    a table logged with media is stored as a run-table artifact, its images beside it."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "artifact" and rec.artifact.name.endswith(name_suffix):
            out = {e.path: e.local_path for e in rec.artifact.manifest.contents}
    return out
