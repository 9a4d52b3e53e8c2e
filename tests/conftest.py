"""Shared pytest set-up: in-process CLI runs apply the CPU thread policy (torch.set_num_threads); each test gets the
session's thread count back so that one test's --threads does not slow or change the next."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
