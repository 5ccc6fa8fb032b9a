"""Fixtures for the method-layer tests.

Every tensor here is tiny, so intra-op threading only adds synchronisation cost (and makes the
suite slow and noisy on a loaded 2-core machine); run each test single-threaded and restore the
previous setting afterwards so other test folders are unaffected.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
