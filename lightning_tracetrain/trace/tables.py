"""What a trace holds besides weights, as plain tables: per step, per example row, per factor row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class StepTable:
    """Per-step metadata, one entry per recorded optimizer step (numpy arrays)."""

    global_step: np.ndarray  # int64 (steps,)
    epoch: np.ndarray  # int64 (steps,)
    batch_idx: np.ndarray  # int64 (steps,)
    skipped: np.ndarray  # bool (steps,): AMP skipped the step, its delta is zero
    label: np.ndarray  # int64 (steps,): class of a single-class step (its real rows), -1 for mixed batches
    lr: np.ndarray  # float64 (steps, param groups), columns named by Trace.lr_columns
    example_start: np.ndarray  # int64 (steps,): the step's rows in Trace.examples
    example_stop: np.ndarray  # int64 (steps,)
    nonfinite: np.ndarray  # bool (steps,): the step changed a weight by NaN or infinity (all False in version 1)

    @property
    def rows(self) -> np.ndarray:
        """Example rows of each step."""
        return self.example_stop - self.example_start


@dataclass(frozen=True)
class Examples:
    """Training examples of one or more steps: dataset ids, labels and ghost flags."""

    index: np.ndarray  # int64 (rows,)
    label: np.ndarray  # (rows,) or (rows, width); -1 where the batch had no labels
    ghost: np.ndarray  # bool (rows,)

    def __getitem__(self, rows: slice) -> Examples:
        return Examples(self.index[rows], self.label[rows], self.ghost[rows])


@dataclass  # not frozen: Lightning moves the tensors of a dataclass batch to the device in place
class FactorRows:
    """A factored layer's factors for a range of steps: one row per example row of those steps."""

    inputs: Tensor  # (rows, in_features): the layer's input row
    outputs: Tensor  # (rows, out_features): -lr times the loss gradient of the layer's output row
    counts: Tensor  # int64 (steps,): rows of each step, in order
    row_start: int  # the first row's position in Trace.examples


@dataclass  # not frozen: Lightning moves the tensors of a dataclass batch to the device in place
class LowRankFactors:
    """A low-rank layer's weight changes for a range of steps: step ``t`` changed it by ``p[t] @ q[t].T``."""

    p: Tensor  # (steps, out, rank)
    q: Tensor  # (steps, in * kernel, rank)
    shape: tuple[int, ...]  # the weight's shape
