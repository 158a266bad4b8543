"""Fixtures for the efficiency tests: one CPU thread (helpers live in helpers.py)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the CI machine is small and shared: one intra-op thread is much faster than oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
