"""kvgate.gctune: the serving process's collector settings (restored after each test)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from kvgate.gctune import tune_for_serving


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuning_freezes_the_heap_and_raises_the_first_threshold(restore_gc: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    assert tune_for_serving(12_345)
    assert gc.get_freeze_count() > 1000  # the test process's modules, at least
    assert gc.get_threshold() == (12_345, gen1, gen2)


def test_zero_changes_nothing(restore_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    assert not tune_for_serving(0)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
