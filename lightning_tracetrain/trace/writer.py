"""Appending steps to an open trace a chunk at a time, so that a crash loses no committed step.

The training thread hands over one :class:`~lightning_tracetrain.trace.records.StepRecord` per optimizer
step. The steps are gathered a chunk at a time in memory, the chunk is written,
and only then is ``steps_committed`` bumped: a crash at any moment leaves a
trace that opens and holds every committed step. A writer works on background
threads (a bounded queue, so a slow disk slows training down instead of filling
memory) or *inline*, on the training thread, for CPU training into a local
trace: there extra threads only compete with PyTorch's for the same cores.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from lightning_tracetrain.exceptions import TraceWriteError
from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.background import STOP, Flush, Inline, noop, wait, yield_cpu
from lightning_tracetrain.trace.chunks import AppendedRows, ChunkEncoder, trim, write_rows
from lightning_tracetrain.trace.records import StepRecord, example_rows, factor_rows, step_columns
from lightning_tracetrain.trace.schema import StorageMode, TraceSpec
from lightning_tracetrain.trace.store import create_labels, is_url, optional_array
from lightning_tracetrain.trace.window import StepWindows


class TraceWriter:
    """Appends :class:`StepRecord` s to an open trace, on background threads or inline.

    The *writer* thread copies each step into a chunk-aligned window of steps
    in memory; the *committer* thread writes a window when it is full, on
    :meth:`flush`, or after ``commit_every_s`` seconds with pending steps, and
    bumps ``steps_committed`` only after the data is written. Two windows
    alternate, so steps keep flowing while the previous window is written.

    ``inline``: :meth:`put` takes the step on the calling thread (the deltas are
    computed straight into the window) and writes a full window before it
    returns, so one window is enough; the writer thread only commits on
    :meth:`flush`, at close, and when ``commit_every_s`` passed since the last
    commit (holding the lock, so a step taken meanwhile waits for it).

    With ``storage="compact"`` each step is rounded after adding the previous
    step's rounding error (``carry``; pass the one a checkpoint kept to resume).
    """

    def __init__(
        self,
        group: zarr.Group,
        *,
        start: int,
        max_pending: int = 8,
        commit_every_s: float = 30.0,
        path: str = "",
        carry: np.ndarray | None = None,
        inline: bool = False,
    ) -> None:
        self._group = group
        self._inline = inline
        self._path = path or str(group.store)
        self.run_id = str(group.attrs["run_id"])
        spec = TraceSpec.from_attrs(dict(group.attrs))
        self._chunk = spec.chunk_steps
        self._arrays = [  # deltas are rarely all zero: skip zarr's scan of every chunk for it
            group[path].with_config({"write_empty_chunks": True}) for path in spec.step_value_paths()
        ]
        self._residual_slot = int((group.attrs.get("residual") or {}).get("slot", 1))
        self._factors = {
            name: tuple(group[schema.factor_path(name, side)] for side in ("in", "out")) for name in spec.factored
        }
        self._encoders = {id(arr): enc for arr in self._arrays if (enc := ChunkEncoder.for_array(arr)) is not None}
        count = 1 if inline else 2  # inline: a window is written before it is refilled
        keepbits = spec.keepbits if spec.mode == StorageMode.compact else None
        shapes = [tuple(arr.shape[1:]) for arr in self._arrays]
        self._windows = StepWindows(shapes, self._chunk, count, keepbits=keepbits, carry=carry)
        # a resumed version-1 trace has no steps/nonfinite: it stays version 1
        self._steps = {
            name: array
            for name in schema.STEP_ARRAYS
            if (array := optional_array(group, schema.step_path(name))) is not None
        }
        self.first_nonfinite: int | None = None  # global step of the first step that changed a weight by NaN/inf
        self._example_start = self._examples_committed = int(group.attrs.get("examples_committed", 0))
        self._examples = {name: group[schema.example_path(name)] for name in ("index", "ghost")}
        if (label := optional_array(group, schema.example_path("label"))) is not None:
            self._examples["label"] = label
        self._appended: dict[int, AppendedRows] = {}  # the arrays of steps and examples, by id
        for arr in self._steps.values():
            self._append_whole(arr, start)
        for arr in [*self._examples.values(), *itertools.chain(*self._factors.values())]:
            self._append_whole(arr, self._example_start)
        self._commit_every_s = commit_every_s
        self._window_commit: list[Future[None] | None] = [None] * count  # last commit that reads each window
        self._current = 0
        self._start = start  # first step of the current window
        self.committed = start
        last = self.last_global_step()  # checkpoints of steps a resume dropped are not this trace's any more
        self._checkpoints = [c for c in group.attrs.get("checkpoints", []) if c.get("global_step", 0) <= last + 1]
        self._pending: list[StepRecord] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # held while a step is taken or a window is handed over
        self._last_commit = time.monotonic()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._committer: ThreadPoolExecutor | Inline = (
            Inline()
            if inline
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-commit", initializer=yield_cpu)
        )
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    @property
    def carry(self) -> np.ndarray | None:
        """``storage="compact"``: the rounding error after the last queued step (call after :meth:`flush`)."""
        return None if self._windows.carry is None else self._windows.carry.copy()

    # ---- training thread

    def put(self, record: StepRecord) -> None:
        """Queue a step (blocks while ``max_pending`` steps wait: backpressure); inline: take it now."""
        self._raise_if_failed()
        if not self._inline:
            self._queue.put(record)
            return
        with self._lock:
            self._take(record)

    def flush(self, *, wait: bool = True, residual: dict[str, np.ndarray] | None = None) -> None:
        """Commit every queued step; with ``wait`` return only once it is committed. ``residual``
        (``storage="lowrank"``, by layer) is what the stored steps lack after the last queued one."""
        self._raise_if_failed()
        item = Flush(residual)
        self._queue.put(item)
        if wait:
            item.done.wait()
            self._raise_if_failed()

    def close(self, *, raise_errors: bool = True, residual: dict[str, np.ndarray] | None = None) -> None:
        """Commit what is queued (with ``residual``, as :meth:`flush`), stop both threads and trim the arrays to
        the committed steps."""
        if self._thread.is_alive():
            if residual is not None:
                self._queue.put(Flush(residual))
            self._queue.put(STOP)
            self._thread.join()
        if raise_errors:
            self._raise_if_failed()

    def note_checkpoint(self, path: str, global_step: int) -> None:
        """Record that the run saved a checkpoint at ``path`` after ``global_step`` steps (written with the
        next commit, or at close), so that a tool can name the checkpoint that matches the trace; local
        files deleted since (ModelCheckpoint keeps its top k) are forgotten."""
        kept = [c for c in self._checkpoints if c["path"] != path and (is_url(c["path"]) or os.path.exists(c["path"]))]
        self._checkpoints = [*kept, {"path": path, "global_step": int(global_step)}]  # one assignment: thread-safe

    def last_global_step(self) -> int:
        """Global step of the last committed record (-1 when none)."""
        if self.committed == 0:
            return -1
        return int(self._steps["global_step"][self.committed - 1])

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        exc = self._error
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        why = "the disk is full" if full else f"{type(exc).__name__}: {exc}"
        fix = "free some space, then" if full else "fix the cause, then"
        raise TraceWriteError(
            f"Writing the trace at {self._path} failed: {why}. Its {self.committed} committed steps are intact and "
            f"readable with Trace({self._path!r}); {fix} resume from the last checkpoint with "
            "trainer.fit(..., ckpt_path=...) to continue the same trace."
        ) from exc

    # ---- writer thread

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            with self._lock:
                if item is None:  # a timed commit, unless one came meanwhile (inline: from the training thread)
                    if self._pending and time.monotonic() - self._last_commit >= self._commit_every_s:
                        self._submit()
                elif item is STOP or isinstance(item, Flush):
                    self._submit()
                    if isinstance(item, Flush) and item.residual is not None:
                        self._committer.submit(self._guard, self._write_residual, item.residual, self._queued)
                    wait(self._committer.submit(noop))  # commits run in order: this one ends after all of them
                    if item is STOP:
                        wait(self._committer.submit(self._guard, self._tidy))
                        self._committer.shutdown()
                        return
                    item.done.set()
                else:
                    self._take(item)

    def _timeout(self) -> float | None:
        """How long the writer thread may wait for the next item before a timed commit is due."""
        if self._error is not None:
            return None
        if self._pending:
            return max(0.0, self._commit_every_s - (time.monotonic() - self._last_commit))
        return self._commit_every_s if self._inline else None  # inline steps arrive without waking this thread

    def _take(self, record: StepRecord) -> None:
        """Append a step to the window; hand the window over when it is full."""
        if self._error is not None:  # keep draining so the training thread never blocks forever
            if record.deltas is not None:
                record.deltas.release()
            return
        self._guard(self._append, record)
        if len(self._pending) == self._capacity:
            self._submit()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as exc:  # reported to the training thread by the next put/flush
            self._error = exc

    @property
    def _queued(self) -> int:
        """Steps handed to this writer so far, committed or not."""
        return self._start + len(self._pending)

    @property
    def _capacity(self) -> int:
        return self._chunk - self._start % self._chunk

    def _append(self, record: StepRecord) -> None:
        row = len(self._pending)
        if row == 0:  # the window's previous commit must have read it before it is refilled
            wait(self._window_commit[self._current])
        record.nonfinite = self._windows.put(self._current, row, record.deltas)
        if record.factors:
            record.nonfinite |= not all(
                np.isfinite(a).all() and np.isfinite(g).all() for a, g in record.factors.values()
            )
        if record.nonfinite and self.first_nonfinite is None:
            self.first_nonfinite = record.global_step
        self._pending.append(record)

    def _submit(self) -> Future[None] | None:
        """Hand the current window's pending steps to the committer; start a new window when it is full."""
        self._last_commit = time.monotonic()
        n = len(self._pending)
        if n == 0 or self._error is not None:
            return None
        # A chunk-aligned window is written whole, so zarr never reads back and decodes a partly written
        # chunk; rows past the committed ones are zeros or later steps, and readers ignore them.
        rows = self._chunk if self._start % self._chunk == 0 else n
        data = self._windows.data(self._current, n, rows)
        job = (self._start, self._example_start, list(self._pending), data)
        future = self._committer.submit(self._guard, self._commit, *job)
        self._window_commit[self._current] = future
        if n == self._capacity:
            self._start += n
            self._example_start += sum(len(r.index) for r in self._pending)
            self._pending = []
            self._current = (self._current + 1) % len(self._window_commit)
        return future

    # ---- committer thread (commits run one at a time, in order; none runs after a failure)

    def _commit(self, start: int, e_start: int, recs: list[StepRecord], data: list[np.ndarray]) -> None:
        n = len(recs)
        columns = step_columns(recs, e_start)
        e_stop = int(columns["example_stop"][-1])
        writes = [(arr, start, values) for arr, values in zip(self._arrays, data, strict=True)]
        writes += [(self._steps[name], start, values) for name, values in columns.items() if name in self._steps]
        if e_stop > e_start:
            rows = example_rows(recs)
            writes += [(self._examples[name], e_start, rows[name]) for name in ("index", "ghost")]
            writes.append((self._label_array(recs), e_start, rows["label"]))
            for name, arrays in self._factors.items():
                for side, arr in enumerate(arrays):
                    writes.append((arr, e_start, factor_rows(recs, name, side, arr.shape[1])))
        encoded = {}  # whole chunks, encoded here (the committer thread runs at a low priority)
        for arr, first, values in writes:
            if (rows := self._appended.get(id(arr))) is not None:
                encoded[id(arr)] = rows.encode(first, values)
            elif (encoder := self._encoders.get(id(arr))) is not None and encoder.fits(first, values):
                encoded[id(arr)] = encoder.encode_chunks(first, values)
        zarr_sync(write_rows(writes, encoded))  # data first, in one round trip to zarr's event loop ...
        counters = {"steps_committed": start + n, "examples_committed": e_stop}
        self._group.update_attributes({**counters, "checkpoints": self._checkpoints})  # ... then commit
        self.committed = start + n
        self._examples_committed = e_stop

    def _write_residual(self, residual: dict[str, np.ndarray], steps: int) -> None:
        """Write the residual after ``steps`` steps into the slot not in use, then name it (crash-safe)."""
        slot = 1 - self._residual_slot
        for layer, values in residual.items():
            self._group[schema.residual_path(layer)][slot] = values
        self._group.update_attributes({"residual": {"steps": steps, "slot": slot}})
        self._residual_slot = slot

    def _tidy(self) -> None:
        """Cut the arrays' shapes back to the committed rows (they grow ahead in whole chunks); note the last
        checkpoints."""
        steps = [(arr, self.committed) for arr in [*self._arrays, *self._steps.values()]]
        examples = [*self._examples.values(), *itertools.chain(*self._factors.values())]
        zarr_sync(trim([*steps, *((arr, self._examples_committed) for arr in examples)]))
        if self._checkpoints != self._group.attrs.get("checkpoints", []):
            self._group.update_attributes({"checkpoints": self._checkpoints})

    def _append_whole(self, arr: zarr.Array, rows: int) -> None:
        """Write ``arr`` (holding ``rows`` rows) a whole chunk at a time from now on, where its codecs allow."""
        if (encoder := ChunkEncoder.for_array(arr)) is not None:
            self._appended[id(arr)] = AppendedRows(arr, encoder, rows)

    def _label_array(self, recs: list[StepRecord]) -> zarr.Array:
        if "label" not in self._examples:
            sample = next((r.label for r in recs if r.label is not None), None)
            self._examples["label"] = create_labels(self._group, sample, self._examples["index"].compressors)
            self._append_whole(self._examples["label"], 0)  # rows before its first write hold -1
        return self._examples["label"]
