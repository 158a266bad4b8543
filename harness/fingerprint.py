"""Content fingerprints behind the cell identity: what a record's answers depend on, hashed.

* a local checkpoint folder: the full bytes of every file that affects outputs (`config.json`,
  `generation_config.json`, chat template, tokenizer and processor files, every safetensors shard and
  its index, remote code) -- see `OUTPUT_FILES`; documentation and training logs are left out;
* a hub id: the commit its revision resolves to (from the local Hugging Face cache when offline);
* any single file (a calibration artefact given by path) or folder (a custom lmms-eval task).

Hashing a 14 GB checkpoint takes about a minute, so every file digest is cached on disk by
(absolute path, size, mtime, ctime, inode, device): a repeated run stats the files and hashes nothing.
An edit of any byte changes mtime and ctime (ctime cannot be set by a user), so a stale digest is never
served. The cache is a JSON file under `$VTBENCH_CACHE` (default `~/.cache/vtbench`); it is validated
when read and rebuilt if corrupt. Hashing that takes more than a second shows a progress bar on stderr.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

#: files of a checkpoint folder that change a model's outputs (matched against the relative path)
OUTPUT_FILES = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "chat_template.json", "chat_template.jinja", "*.jinja", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken", "preprocessor_config.json",
    "processor_config.json", "image_processor*.json", "video_preprocessor_config.json", "*.py",
)
#: files of a custom lmms-eval task folder that change its answers
TASK_FILES = ("*.yaml", "*.yml", "*.py", "*.json", "*.jinja")

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_MEMO: dict[tuple, str] = {}  # in-process layer over the disk cache
_CACHE_FILE = "file-digests.json"


class FingerprintError(OSError):
    """A file that is part of a cell's identity cannot be read; one line."""


def cache_dir() -> Path:
    root = os.environ.get("VTBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vtbench")
    return Path(root)


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _load_disk_cache() -> dict[str, dict]:
    try:
        data = json.loads((cache_dir() / _CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    ok = {}
    for path, e in data.items():  # validated entry by entry: a garbled entry is dropped, never trusted
        if (isinstance(e, dict) and isinstance(e.get("stat"), list) and len(e["stat"]) == 5
                and all(isinstance(x, int) for x in e["stat"]) and isinstance(e.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
            ok[path] = e
    return ok


def _save_disk_cache(new: dict[str, dict]) -> None:
    """Merge `new` entries into the cache file (atomic replace; a lost race only costs a re-hash)."""
    if not new:
        return
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        data = _load_disk_cache()
        data.update(new)
        data = {p: e for p, e in data.items() if os.path.exists(p)}  # forget deleted files
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".digests.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, d / _CACHE_FILE)
    except OSError:  # a read-only cache only costs time
        pass


def file_digests(paths: list[Path], what: str = "files") -> dict[Path, str]:
    """sha256 of each file's full bytes, from the (stat-keyed) cache where the file is unchanged."""
    out: dict[Path, str] = {}
    todo: list[tuple[Path, tuple]] = []
    disk = None
    for p in paths:
        try:
            sk = _stat_key(p)
        except OSError as e:
            raise FingerprintError(f"cannot read {p}: {e.strerror or e}") from None
        if sk in _MEMO:
            out[p] = _MEMO[sk]
            continue
        if disk is None:
            disk = _load_disk_cache()
        e = disk.get(sk[0])
        if e and tuple(e["stat"]) == sk[1:]:
            out[p] = _MEMO[sk] = e["sha256"]
        else:
            todo.append((p, sk))
    if todo:
        from tqdm import tqdm

        total = sum(sk[1] for _, sk in todo)
        new = {}
        with tqdm(total=total, unit="B", unit_scale=True, delay=1.0, file=sys.stderr, leave=False,
                  desc=f"[vtbench] hashing {what}") as bar:
            for p, sk in todo:
                h = hashlib.sha256()
                try:
                    with open(p, "rb") as f:
                        for chunk in iter(lambda: f.read(8 << 20), b""):
                            h.update(chunk)
                            bar.update(len(chunk))
                except OSError as e:
                    raise FingerprintError(f"cannot read {p}: {e.strerror or e}") from None
                if _stat_key(p) != sk:  # changed while hashing: hash it again next time
                    raise FingerprintError(f"{p} changed while it was being hashed; run again")
                out[p] = _MEMO[sk] = h.hexdigest()
                new[sk[0]] = {"stat": list(sk[1:]), "sha256": out[p]}
        _save_disk_cache(new)
    return out


def _matching(folder: Path, patterns) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or not p.is_file():
            continue  # .git, .cache, hidden temp files
        if any(fnmatch.fnmatch(p.name, pat) or fnmatch.fnmatch(rel, pat) for pat in patterns):
            files.append(p)
    return files


def folder_digest(folder: str | os.PathLike, patterns=OUTPUT_FILES, what: str = "checkpoint files") -> dict:
    """`{"sha256": <combined 16 hex>, "files": {relative path: sha256[:16]}}` of the matching files."""
    folder = Path(folder)
    files = _matching(folder, patterns)
    digests = file_digests(files, what)
    per_file = {p.relative_to(folder).as_posix(): digests[p] for p in files}
    combined = hashlib.sha256(json.dumps(per_file, sort_keys=True).encode()).hexdigest()[:16]
    return {"sha256": combined, "files": {k: v[:16] for k, v in per_file.items()}}


def file_digest(path: str | os.PathLike) -> str:
    p = Path(os.path.expanduser(str(path)))
    return file_digests([p], "file")[p][:16]


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub revision resolves to: a 40-hex revision is itself; otherwise the local Hugging
    Face cache's ref (offline), or the hub's answer (online). None when it cannot be resolved (the
    loader then fails in one line: offline and not cached)."""
    rev = revision or "main"
    if _HEX40.match(rev):
        return rev
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (folder / "refs" / rev).read_text().strip()
        if _HEX40.match(commit):
            return commit
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=rev).sha
    except Exception:  # no network / no such repo: the loader reports it in one line
        return None
