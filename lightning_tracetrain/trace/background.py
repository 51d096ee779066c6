"""What the trace writer's background threads pass around and how they yield the CPU to training."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future

import numpy as np


class Flush:
    """Commit what is queued; ``residual`` (lowrank) is written with it, as of the last queued step."""

    def __init__(self, residual: dict[str, np.ndarray] | None = None) -> None:
        self.done = threading.Event()
        self.residual = residual


STOP = object()  # the last item of the writer's queue: commit what is left, then end


def wait(future: Future[None] | None) -> None:
    """Wait for a commit (and raise what it raised); None: nothing to wait for."""
    if future is not None:
        future.result()


def noop() -> None:
    """A commit that does nothing: it ends after every commit submitted before it."""


def yield_cpu() -> None:
    """Lower the calling thread's scheduling priority (Linux; elsewhere a no-op), so that encoding chunks uses
    the cores that training leaves idle instead of competing with its threads; backpressure keeps it going."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priorities here, or not allowed
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))
