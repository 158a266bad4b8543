"""Shared fixtures: offline environment, a tiny random LLaVA checkpoint on disk, a data folder."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# one intra-op thread per process, for the console scripts the tests start too: `make test` runs two pytest
# workers (pytest-xdist) on a 2-core machine, and OpenMP threads on busy cores spin instead of working
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# sweeps answer their cells one after another in the sweep's process unless a test asks for workers
# (`run.workers=N`): `make test` already runs two pytest workers
os.environ.setdefault("VTBENCH_WORKERS", "1")
# file digests and data verifications are cached here, not in the user's ~/.cache
os.environ.setdefault("VTBENCH_CACHE", __import__("tempfile").mkdtemp(prefix="vtbench-cache-"))
os.environ.setdefault("WANDB_DATA_DIR", __import__("tempfile").mkdtemp(prefix="vtbench-wandb-data-"))  # W&B staging
# single runs save their composed config under hydra.run.dir (`outputs/` by default): not in the checkout
if "VTBENCH_OUTPUTS" not in os.environ:
    import tempfile

    os.environ["VTBENCH_OUTPUTS"] = tempfile.mkdtemp(prefix="vtbench-test-outputs-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread (and the suite must not oversubscribe a 2-core CI machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Entry points called in-process may set their own thread count (`--threads`): each test starts with one."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random LLaVA (llama LM) saved with save_pretrained: a local checkpoint folder."""
    from harness.models.tiny import build_tiny

    path = tmp_path_factory.mktemp("tiny-ckpt")
    model, processor = build_tiny("llava", "llama")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vtbench-data"))


@pytest.fixture
def cell_overrides(tiny_checkpoint, data_dir, tmp_path):
    """Overrides for a fast, isolated cell on the tiny random checkpoint."""
    return [
        f"model.pretrained={tiny_checkpoint}",
        f"data_dir={data_dir}",
        f"store.dir={tmp_path / 'store'}",
        f"logger.dir={tmp_path / 'wandb'}",
        "run.limit=4",
        "run.efficiency.enabled=false",
    ]
