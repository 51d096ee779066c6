"""On real data (digits): ghost batch norm makes single-class batches train as well as shuffled ones."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "ghost_batchnorm.py"
    spec = importlib.util.spec_from_file_location("ghost_batchnorm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_class_batches_need_ghost_batch_norm():
    bench = _benchmark()
    acc = {variant: bench.accuracy_of(variant, epochs=10, seed=0) for variant in bench.VARIANTS}
    shuffled = acc["shuffled_batchnorm"]
    assert shuffled > 0.95, acc
    assert abs(acc["single_class_ghost_batchnorm"] - shuffled) <= 0.03, acc
    assert acc["single_class_plain_batchnorm"] < shuffled - 0.2, acc
