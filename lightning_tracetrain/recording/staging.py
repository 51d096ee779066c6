"""Moving each step's deltas off the device without making training wait.

The deltas of every traced parameter are computed into one flat buffer and
copied to host memory in one piece (pinned and non-blocking on CUDA); a small
pool of host buffers circulates between the training thread and the trace
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

    def __init__(self, flat: Tensor, event: Any = None, release: Callable[[], None] | None = None):
        self._flat = flat
        self._event = event
        self._release = release

    def array(self) -> np.ndarray:
        """The deltas as one flat host array; waits for the device copy when there is one."""
        if self._event is not None:
            self._event.synchronize()
        return self._flat.numpy()

    def release(self) -> None:
        """Give the staging buffer back (after its contents were copied)."""
        if self._release is not None:
            self._release()
            self._release = None


class DeltaStager:
    """Computes each step's deltas into one flat buffer and moves it off the device without blocking.

    ``slots`` host buffers circulate between the training thread and the writer. On CPU the
    deltas are computed straight into a free slot. On an accelerator they are computed into
    one device buffer and copied in one piece into a slot (pinned, ``non_blocking=True`` on
    CUDA; a CUDA event tells the writer when the copy landed). When every slot is in use,
    :meth:`stage` waits: that is the backpressure.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], device: torch.device, slots: int = 4) -> None:
        self._shapes = [tuple(s) for s in shapes]
        self._numels = [int(np.prod(s)) for s in self._shapes]
        total = sum(self._numels)
        self._cuda = device.type == "cuda"
        self._device: tuple[Tensor, list[Tensor]] | None = None
        if device.type != "cpu":
            flat = torch.empty(total, dtype=torch.float32, device=device)
            self._device = (flat, self._views(flat))
        self._free: queue.Queue[tuple[Tensor, list[Tensor]]] = queue.Queue()
        for _ in range(slots):
            flat = torch.empty(total, dtype=torch.float32, pin_memory=self._cuda)
            self._free.put((flat, self._views(flat)))

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(torch.split(flat, self._numels), self._shapes, strict=True)]

    def stage(self, after: Sequence[Tensor], before: Sequence[Tensor], extra: Sequence[Tensor] = ()) -> StagedDeltas:
        """``after - before`` for every parameter (see :func:`~lightning_tracetrain.functional.weight_deltas`),
        followed by ``extra`` tensors already computed (the low-rank factors), in the order of the shapes."""
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
        return StagedDeltas(host, event, release=lambda: self._free.put(slot))
