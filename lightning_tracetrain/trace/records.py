"""One optimizer step as the writer receives it, the trace's rows for a run of such steps, and the example
rows a step collects from its batches before it is recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor


class Staged(Protocol):
    """A step's deltas on their way to host memory (see ``recording.staging``)."""

    def write(self, rows: Sequence[Tensor]) -> None:
        """Put every stored array's delta into its row of the writer's chunk window (waits for a device copy)."""

    def release(self) -> None:
        """Give the buffer back once its contents were copied."""


@dataclass
class StepRecord:
    """Everything the trace stores about one optimizer step."""

    global_step: int
    epoch: int
    batch_idx: int
    lr: Sequence[float]
    index: np.ndarray
    ghost: np.ndarray
    label: np.ndarray | None
    deltas: Staged | None  # None: the step was skipped (AMP found inf/nan), its delta is zero
    # storage="factored": per factored layer, (input rows, -lr * output gradient rows), one row per example
    factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    nonfinite: bool = False  # the step changed a weight by NaN or infinity (set by the writer)

    @property
    def skipped(self) -> bool:
        return self.deltas is None


def step_columns(recs: list[StepRecord], example_start: int) -> dict[str, np.ndarray]:
    """The ``steps/`` arrays' rows for ``recs``, whose example rows start at ``example_start``."""
    counts = np.array([len(r.index) for r in recs], dtype=np.int64)
    return {
        "global_step": np.array([r.global_step for r in recs], dtype=np.int64),
        "epoch": np.array([r.epoch for r in recs], dtype=np.int64),
        "batch_idx": np.array([r.batch_idx for r in recs], dtype=np.int64),
        "skipped": np.array([r.skipped for r in recs], dtype=bool),
        "example_stop": example_start + np.cumsum(counts),
        "label": np.array([step_label(r) for r in recs], dtype=np.int64),
        "lr": np.array([list(r.lr) for r in recs], dtype=np.float64).reshape(len(recs), -1),
        "nonfinite": np.array([r.nonfinite for r in recs], dtype=bool),
    }


def example_rows(recs: list[StepRecord]) -> dict[str, np.ndarray]:
    """The ``examples/`` arrays' rows for ``recs``: ids, ghost flags, labels (-1 where a batch had none)."""
    width = next((r.label.shape[1:] for r in recs if r.label is not None), ())
    labels = [r.label if r.label is not None else np.full((len(r.index), *width), -1) for r in recs]
    return {
        "index": np.concatenate([r.index for r in recs]),
        "ghost": np.concatenate([r.ghost for r in recs]),
        "label": np.concatenate(labels),
    }


def factor_rows(recs: list[StepRecord], layer: str, side: int, width: int) -> np.ndarray:
    """One factor of a layer for all rows of ``recs``; a skipped step's rows are zeros (it changed nothing)."""
    parts = [
        r.factors[layer][side] if r.factors is not None else np.zeros((len(r.index), width), np.float32) for r in recs
    ]
    return np.concatenate(parts)


def step_label(record: StepRecord) -> int:
    """The class of a single-class step: the one label of its real rows, else -1."""
    if record.label is None or record.label.ndim != 1 or record.label.dtype.kind not in "iub":
        return -1
    real = np.unique(record.label[~record.ghost])
    return int(real[0]) if len(real) == 1 else -1


class PendingExamples:
    """The example rows of the batches seen since the last step (all batches of an accumulation window)."""

    def __init__(self) -> None:
        self._pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        self._last: tuple[np.ndarray, np.ndarray | None, np.ndarray] = (np.zeros(0, np.int64), None, np.zeros(0, bool))

    def add(self, index: np.ndarray, label: np.ndarray | None, ghost: np.ndarray) -> None:
        self._pending.append((index, label, ghost))

    def take(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Merge the pending batches; a second step within the same batch (manual optimization) gets the same."""
        if len(self._pending) == 1:  # the usual case: one batch, one step
            self._last = self._pending[0]
        elif self._pending:  # gradient accumulation: the step was produced by several batches
            labels = [p[1] for p in self._pending]
            label = None if any(lab is None for lab in labels) else np.concatenate(labels)  # type: ignore[arg-type]
            self._last = (
                np.concatenate([p[0] for p in self._pending]),
                label,
                np.concatenate([p[2] for p in self._pending]),
            )
        self._pending = []
        return self._last
