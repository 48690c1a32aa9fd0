"""Fixtures for the models tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The models under test are tiny: with two intra-op threads on a shared 2-core machine every step
    # waits on a descheduled thread (measured 8x slower wall time), so run them single-threaded and
    # restore the setting for tests outside this directory.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
