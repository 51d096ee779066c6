"""A chunk of steps in memory, array by array: where the trace writer gathers steps before writing them whole.

A step arrives as one delta per stored array (every traced parameter, then the low-rank factors);
a window keeps a chunk of steps for each array as one contiguous ``(steps, *shape)`` block, so
that a full window is the arrays' next chunks, ready to encode. ``storage="compact"`` rounds each
step after adding the previous step's rounding error (the *carry*).
"""

from __future__ import annotations

import itertools

import numcodecs
import numpy as np
import torch

from lightning_tracetrain.trace.records import Staged


class StepWindows:
    """``count`` windows of ``chunk`` steps for arrays of ``shapes`` (one, or two that alternate)."""

    def __init__(
        self,
        shapes: list[tuple[int, ...]],
        chunk: int,
        count: int,
        *,
        keepbits: int | None = None,
        carry: np.ndarray | None = None,
    ) -> None:
        sizes = [int(np.prod(s)) for s in shapes]
        bounds = [int(b) for b in np.cumsum([0, *sizes])]
        self._columns = [slice(a, b) for a, b in itertools.pairwise(bounds)]  # each array's values in a flat step
        flats = [np.zeros(chunk * bounds[-1], dtype=np.float32) for _ in range(count)]
        spans = list(zip(self._columns, shapes, strict=True))
        self._blocks = [[flat[chunk * c.start : chunk * c.stop].reshape(chunk, *s) for c, s in spans] for flat in flats]
        self._tensors = [[torch.from_numpy(block) for block in blocks] for blocks in self._blocks]
        self._round = None if keepbits is None else numcodecs.BitRound(keepbits)
        self.carry: np.ndarray | None = None  # compact: the rounding error after the last step put
        if self._round is not None:
            self.carry = np.zeros(bounds[-1], dtype=np.float32) if carry is None else carry.astype(np.float32)
            if self.carry.shape != (bounds[-1],):
                raise ValueError(f"A compact carry of {self.carry.shape} for {bounds[-1]} stored values.")

    def put(self, window: int, row: int, deltas: Staged | None) -> bool:
        """Write a step's deltas (None: a skipped step, zeros) into ``row``; True when a value is NaN or infinite."""
        rows = [block[row] for block in self._blocks[window]]
        if deltas is None:
            for r in rows:
                r.fill(0.0)
            return False
        try:
            deltas.write([tensor[row] for tensor in self._tensors[window]])
        finally:
            deltas.release()
        nonfinite = not all(all_finite(r) for r in rows)
        if self._round is not None:
            self._round_rows(rows)
        return nonfinite

    def data(self, window: int, filled: int, rows: int) -> list[np.ndarray]:
        """The first ``rows`` rows of every array's block, those past ``filled`` set to zeros (not an earlier
        chunk's steps)."""
        blocks = self._blocks[window]
        if rows > filled:
            for block in blocks:
                block[filled:rows] = 0.0
        return [block[:rows] for block in blocks]

    def _round_rows(self, rows: list[np.ndarray]) -> None:
        """Each row plus the previous rounding error, rounded in place; keeps the new error."""
        assert self._round is not None and self.carry is not None
        for row, cols in zip(rows, self._columns, strict=True):
            flat = row.reshape(-1)  # a view: a row of a block is contiguous
            value = flat + self.carry[cols]
            stored = self._round.encode(value).view(np.float32)
            self.carry[cols] = value - stored
            flat[:] = stored


def all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite: a float32 sum is, unless a value is NaN or infinite or the sum overflows
    (then the exact test decides)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(values, axis=None))) or bool(np.isfinite(values).all())
