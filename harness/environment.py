"""What a record needs to be reproduced: package versions, code revision, device."""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vtbench", "torch", "transformers", "lmms_eval", "hydra-core", "fvcore", "wandb", "datasets")


@functools.lru_cache(maxsize=None)
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions(packages=PACKAGES) -> dict:
    return {p: _version(p) for p in packages}


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    import torch

    return {
        "versions": versions(),
        "python": platform.python_version(),
        "git": git_state(),
        "code_sha256": code_fingerprint(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 (16 hex) of vtbench's own Python sources (harness/, methods/): answers of an interrupted
    cell are resumed only by the code that produced them."""
    import hashlib

    h = hashlib.sha256()
    for pkg in ("harness", "methods"):
        for p in sorted((REPO / pkg).rglob("*.py")):
            h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
