"""Moving each step's deltas off the device without making training wait.

On CPU with an inline writer (a local trace) the deltas are computed straight into the
writer's chunk window when it takes the step: no copy and no thread hop. Otherwise they are
computed into one flat buffer and copied to host memory in one piece (pinned and non-blocking
on CUDA); a small pool of host buffers circulates between the training thread and the trace
writer, which is what bounds memory and applies backpressure.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tracetrain.functional import weight_deltas


class StagedDeltas:
    """One step's parameter deltas, flattened and concatenated, on their way to host memory."""

    def __init__(self, views: list[Tensor], event: Any = None, release: Callable[[], None] | None = None):
        self._views = views
        self._event = event
        self._release = release

    def write(self, rows: Sequence[Tensor]) -> None:
        """Copy the deltas into ``rows`` (one per stored array); waits for the device copy when there is one."""
        if self._event is not None:
            self._event.synchronize()
        for row, view in zip(rows, self._views, strict=True):  # numpy: no torch thread pool on the writer's thread
            np.copyto(row.numpy(), view.numpy())

    def release(self) -> None:
        """Give the staging buffer back (after its contents were copied)."""
        if self._release is not None:
            self._release()
            self._release = None


class DirectDeltas:
    """One step's deltas, computed when the writer takes the step, straight into its chunk window (CPU)."""

    def __init__(self, after: Sequence[Tensor], before: Sequence[Tensor], extra: Sequence[Tensor]) -> None:
        self._after, self._before, self._extra = after, before, extra

    def write(self, rows: Sequence[Tensor]) -> None:
        """``after - before`` into the first rows, ``extra`` (the low-rank factors) into the rest."""
        n = len(self._after)
        if n:
            weight_deltas(self._after, self._before, out=list(rows[:n]))
        if self._extra:
            torch._foreach_copy_(list(rows[n:]), list(self._extra))

    def release(self) -> None:
        """Nothing to give back."""


class DeltaStager:
    """Computes each step's deltas into one flat buffer and moves it off the device without blocking.

    With ``direct`` (CPU, an inline writer) :meth:`stage` computes nothing: the writer computes
    the deltas into its window when it takes the step. Otherwise ``slots`` host buffers
    circulate between the training thread and the writer. On CPU the deltas are computed
    straight into a free slot. On an accelerator they are computed into one device buffer and
    copied in one piece into a slot (pinned, ``non_blocking=True`` on CUDA; a CUDA event tells
    the writer when the copy landed). When every slot is in use, :meth:`stage` waits: that is
    the backpressure.
    """

    def __init__(
        self, shapes: Sequence[Sequence[int]], device: torch.device, slots: int = 4, *, direct: bool = False
    ) -> None:
        if direct and device.type != "cpu":
            raise ValueError(f"Deltas are computed into the writer's window on CPU only, not on {device}.")
        self._direct = direct
        self._shapes = [tuple(s) for s in shapes]
        self._numels = [int(np.prod(s)) for s in self._shapes]
        total = sum(self._numels)
        self._cuda = device.type == "cuda"
        self._device: tuple[Tensor, list[Tensor]] | None = None
        if device.type != "cpu":
            flat = torch.empty(total, dtype=torch.float32, device=device)
            self._device = (flat, self._views(flat))
        self._free: queue.Queue[tuple[Tensor, list[Tensor]]] = queue.Queue()
        for _ in range(0 if direct else slots):
            flat = torch.empty(total, dtype=torch.float32, pin_memory=self._cuda)
            self._free.put((flat, self._views(flat)))

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(torch.split(flat, self._numels), self._shapes, strict=True)]

    def stage(
        self, after: Sequence[Tensor], before: Sequence[Tensor], extra: Sequence[Tensor] = ()
    ) -> StagedDeltas | DirectDeltas:
        """``after - before`` for every parameter (see :func:`~lightning_tracetrain.functional.weight_deltas`),
        followed by ``extra`` tensors already computed (the low-rank factors), in the order of the shapes.
        ``direct``: computed when the writer takes the step, so ``before`` must not change until then."""
        if self._direct:
            return DirectDeltas(after, before, extra)
        slot = self._free.get()
        host, views = slot
        event = None
        n = len(after)
        target = views if self._device is None else self._device[1]
        if n:
            weight_deltas(after, before, out=target[:n])
        if extra:
            torch._foreach_copy_(target[n:], list(extra))
        if self._device is not None:
            host.copy_(self._device[0], non_blocking=self._cuda)  # stream-ordered before the next step's deltas
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
        return StagedDeltas(views, event, release=lambda: self._free.put(slot))
