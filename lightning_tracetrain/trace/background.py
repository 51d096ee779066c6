"""What the trace writer's background threads pass around and how they yield the CPU to training."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

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


class Inline:
    """An executor that runs each job at once on the calling thread (the inline writer's committer)."""

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Run ``fn(*args)`` now; the returned future is done and holds what it raised."""
        future: Future[None] = Future()
        try:
            fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)
        return future

    def shutdown(self) -> None:
        """Nothing to stop."""


def in_background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` on a new daemon thread; the future holds what it returned or raised."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="trace-prepare", daemon=True).start()
    return future
