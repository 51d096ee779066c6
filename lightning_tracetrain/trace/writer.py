"""Appending steps to a trace without making training wait on disk.

The training thread hands each step's deltas to :class:`DeltaStager`, which
starts a non-blocking device-to-host copy (into pinned buffers on CUDA), and
queues a :class:`StepRecord`. A background thread gathers a chunk of steps in
memory, writes it, and only then bumps ``steps_committed``: a crash at any
moment leaves a trace that opens and holds every committed step. The queue is
bounded, so a slow disk slows training down instead of filling memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from torch import Tensor
from zarr.codecs import BloscCodec
from zarr.core.sync import sync as zarr_sync

from lightning_tracetrain.exceptions import TraceExistsError, TraceMismatchError, TraceWriteError
from lightning_tracetrain.functional import weight_deltas
from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.schema import TraceSpec

Compressor = str | zarr.abc.codec.BytesBytesCodec | None
STORAGE_MODES = ("lossless", "compact", "factored")


def make_compressor(compressor: Compressor, storage: str = "lossless") -> zarr.abc.codec.BytesBytesCodec | None:
    """``"auto"`` (default), ``"lz4"``, ``"zstd"``, ``None``/``"none"`` or a Zarr codec.

    Both names are Blosc with bit shuffle. ``"lz4"`` encodes at about 650 MB/s on one core and keeps
    about 0.7 of the float32 bytes of raw deltas; ``"zstd"`` (level 1) about 250 MB/s for 0.63, and
    on BitRound-ed deltas about 600 MB/s for well under a third. ``"auto"`` picks lz4 for ``lossless``
    storage (raw deltas compress little, so speed wins) and zstd for ``compact``.
    """
    if compressor is None or compressor == "none":
        return None
    if isinstance(compressor, str):
        names = {"auto": "auto", "zstd": "zstd", "lz4": "lz4", "blosc-zstd": "zstd", "blosc-lz4": "lz4"}
        if compressor not in names:
            raise ValueError(
                f"Unknown compressor {compressor!r}: use 'auto', 'lz4', 'zstd', 'none' or a zarr BytesBytesCodec."
            )
        cname = names[compressor]
        if cname == "auto":
            cname = "zstd" if storage == "compact" else "lz4"
        return BloscCodec(cname=cname, clevel=1 if cname == "zstd" else 5, shuffle="bitshuffle")
    return compressor


# --------------------------------------------------------------------------- records


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

    def stage(self, after: Sequence[Tensor], before: Sequence[Tensor]) -> StagedDeltas:
        """``after - before`` for every parameter (see :func:`~lightning_tracetrain.functional.weight_deltas`)."""
        slot = self._free.get()
        host, views = slot
        event = None
        if self._device is None:
            weight_deltas(after, before, out=views)
        else:
            weight_deltas(after, before, out=self._device[1])
            host.copy_(self._device[0], non_blocking=self._cuda)  # stream-ordered before the next step's deltas
            if self._cuda:
                event = torch.cuda.Event()
                event.record()
        return StagedDeltas(host, event, release=lambda: self._free.put(slot))


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
    deltas: StagedDeltas | None  # None: the step was skipped (AMP found inf/nan), its delta is zero
    # storage="factored": per factored layer, (input rows, -lr * output gradient rows), one row per example
    factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def skipped(self) -> bool:
        return self.deltas is None


# --------------------------------------------------------------------------- opening a store


def _read_attrs(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Root attributes of the Zarr group at ``path``, or None when nothing is there."""
    try:
        return dict(schema.open_group(path, "r", storage_options).attrs)
    except FileNotFoundError:
        if not schema.is_url(path) and Path(path).is_dir() and any(Path(path).iterdir()):
            raise TraceExistsError(
                f"{path} exists and holds files that are not a trace; "
                "choose a new or empty directory for TraceCallback(dirpath=...)."
            ) from None
        return None


@dataclass(frozen=True)
class ResumeState:
    """What a Lightning checkpoint remembers about the trace it was written with."""

    run_id: str
    records: int


def open_for_writing(
    path: str,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    *,
    resume: ResumeState | None,
    overwrite: bool,
    compressor: zarr.abc.codec.BytesBytesCodec | None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[zarr.Group, int]:
    """Create a trace, or reopen one to continue it; returns the group and its record count.

    Resuming cuts the trace back to the steps the checkpoint had seen, so a
    continued run neither repeats nor skips a step.
    """
    attrs = _read_attrs(path, storage_options)
    if attrs is not None and attrs.get("format") != schema.FORMAT:
        raise TraceExistsError(f"{path} is a Zarr group but not a lightning_tracetrain trace; choose another dirpath.")
    existing = TraceSpec.from_attrs(attrs) if attrs is not None and attrs.get("initialized") else None
    if resume is not None:
        if attrs is None or existing is None:
            raise TraceMismatchError(
                f"The checkpoint being resumed was traced into run {resume.run_id}, but {path} holds no trace. "
                "Point TraceCallback(dirpath=...) at the trace the checkpoint was written with."
            )
        if attrs.get("run_id") != resume.run_id:
            raise TraceMismatchError(
                f"The checkpoint being resumed belongs to trace run {resume.run_id}, but {path} holds run "
                f"{attrs.get('run_id')} ({existing.describe()}). Point dirpath at the checkpoint's own trace."
            )
        committed = int(attrs.get("steps_committed", 0))
        if committed < resume.records:
            raise TraceMismatchError(
                f"The trace at {path} holds {committed} committed steps but the checkpoint was saved after "
                f"{resume.records}; the trace lost steps and cannot be continued without a gap."
            )
        if existing.fingerprint != spec.fingerprint:
            raise TraceMismatchError(
                f"The trace at {path} was recorded for {existing.describe()}, but this run traces "
                f"{spec.describe()}. Trace the same layers of the same model, or choose another dirpath."
            )
        if existing.mode != spec.mode:
            raise TraceMismatchError(
                f"The trace at {path} stores {existing.mode!r} deltas, but this run asks for storage={spec.mode!r}; "
                f"resume with TraceCallback(storage={existing.mode!r}) or trace into another dirpath."
            )
        group = schema.open_group(path, "r+", storage_options)
        truncate(group, resume.records)
        return group, resume.records
    if existing is not None and not overwrite:
        if existing.fingerprint != spec.fingerprint:
            what = f"a trace of another model ({existing.describe()}); this run traces {spec.describe()}"
        else:
            what = f"a trace of an earlier run of this model ({attrs.get('steps_committed', 0)} steps)"
        raise TraceExistsError(
            f"{path} already holds {what}. Pass TraceCallback(overwrite=True) to replace it, resume the earlier "
            "run with trainer.fit(..., ckpt_path=...), or choose another dirpath."
        )
    return _create(path, spec, initial, compressor, storage_options), 0


def _create(
    path: str,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    compressor: zarr.abc.codec.BytesBytesCodec | None,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create a trace; on a local disk it is built beside ``path`` and renamed into place.

    So a run killed at any moment leaves either no trace or a complete one. On object storage
    the trace is built in place; the reader refuses it until its ``initialized`` attribute is set.
    """
    if schema.is_url(path):
        return _build(path, spec, initial, compressor, storage_options)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.creating-{uuid.uuid4().hex[:8]}"
    _build(str(tmp), spec, initial, compressor)
    if final.exists():  # an empty directory, or a trace the user asked to overwrite
        shutil.rmtree(final)
    os.rename(tmp, final)
    return schema.open_group(path, "r+")


def _build(
    path: str,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    compressor: zarr.abc.codec.BytesBytesCodec | None,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    from lightning_tracetrain import __version__

    attrs = {
        "format": schema.FORMAT,
        "format_version": schema.FORMAT_VERSION,
        "initialized": False,  # set once the arrays and initial weights are in place
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "library_version": __version__,
        "steps_committed": 0,
        "examples_committed": 0,
        **spec.to_attrs(),
    }
    group = schema.open_group(path, "w", storage_options, attributes=attrs)
    for lay in spec.layers:
        for param, shape in lay.params.items():
            init = group.create_array(
                schema.initial_path(lay.name, param), shape=shape, dtype="float32", compressors=compressor
            )
            init[...] = initial[(lay.name, param)]
            group.create_array(
                schema.delta_path(lay.name, param),
                shape=(0, *shape),
                chunks=(spec.chunk_steps, *shape),
                dtype="float32",
                fill_value=0.0,
                compressors=compressor,
            )
    for name, dtype in schema.STEP_ARRAYS.items():
        shape = (0, len(spec.lr_columns)) if name == "lr" else (0,)
        chunks = (schema.STEP_CHUNK, max(1, len(spec.lr_columns))) if name == "lr" else (schema.STEP_CHUNK,)
        group.create_array(schema.step_path(name), shape=shape, chunks=chunks, dtype=dtype, compressors=compressor)
    for name in ("index", "ghost"):
        group.create_array(
            schema.example_path(name),
            shape=(0,),
            chunks=(schema.EXAMPLE_CHUNK,),
            dtype=schema.EXAMPLE_ARRAYS[name],
            compressors=compressor,
        )
    group.attrs.update({"initialized": True})
    return group


def truncate(group: zarr.Group, records: int) -> None:
    """Cut every step-axis array back to ``records`` steps (dropping uncommitted or later rows)."""
    examples = 0
    if records > 0:
        examples = int(group[schema.step_path("example_stop")][records - 1])
    for name, node in _walk_arrays(group):
        if not (name.startswith(("steps/", "examples/")) or "/delta/" in name or "/factor/" in name):
            continue  # initial weights have no step axis
        axis_len = examples if name.startswith("examples/") or "/factor/" in name else records
        if node.shape[0] != axis_len:
            node.resize((axis_len, *node.shape[1:]))
    group.attrs.update({"steps_committed": records, "examples_committed": examples})


def _walk_arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out: list[tuple[str, zarr.Array]] = []
    for name, node in group.members():
        path = f"{prefix}{name}"
        if isinstance(node, zarr.Array):
            out.append((path, node))
        else:
            out.extend(_walk_arrays(node, f"{path}/"))
    return out


# --------------------------------------------------------------------------- the writer


def _noop() -> None:
    pass


def _wait(future: Future[None] | None) -> None:
    if future is not None:
        future.result()


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()
_IN_WINDOW = StagedDeltas(torch.zeros(0))  # marks a step whose deltas were copied into the writer's window


class TraceWriter:
    """Appends :class:`StepRecord` s to an open trace on background threads.

    The *writer* thread copies each step into a chunk-aligned window of steps
    in memory; the *committer* thread writes a window when it is full, on
    :meth:`flush`, or after ``commit_every_s`` seconds with pending steps, and
    bumps ``steps_committed`` only after the data is written. Two windows
    alternate, so steps keep flowing while the previous window is written.
    """

    def __init__(
        self,
        group: zarr.Group,
        *,
        start: int,
        max_pending: int = 8,
        commit_every_s: float = 30.0,
        path: str = "",
    ) -> None:
        self._group = group
        self._path = path or str(group.store)
        self._layout(TraceSpec.from_attrs(dict(group.attrs)))
        self._window_commit: list[Future[None] | None] = [None, None]  # last commit that reads each window
        self._current = 0
        self._steps = {name: group[schema.step_path(name)] for name in schema.STEP_ARRAYS}
        self._examples = {name: group[schema.example_path(name)] for name in ("index", "ghost")}
        if "examples/label" in _member_names(group):
            self._examples["label"] = group[schema.example_path("label")]
        self._commit_every_s = commit_every_s
        self._start = start  # first step of the current window
        self._example_start = int(group.attrs.get("examples_committed", 0))
        self.committed = start
        self._pending: list[StepRecord] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-commit")
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def _layout(self, spec: TraceSpec) -> None:
        """The stored arrays and the in-memory windows that collect a chunk of steps for them."""
        self._spec = spec
        self._chunk = spec.chunk_steps
        self._arrays = [  # deltas are rarely all zero: skip zarr's scan of every chunk for it
            self._group[schema.delta_path(lay.name, p)].with_config({"write_empty_chunks": True})
            for lay in spec.layers
            for p in lay.params
            if not (p == "weight" and spec.is_factored(lay.name))
        ]
        self._factors = {
            name: tuple(self._group[schema.factor_path(name, side)] for side in ("in", "out"))
            for name in spec.factored or ()
        }
        # a window holds a chunk of steps, one row per step: every parameter's delta flattened and concatenated
        sizes = [int(np.prod(arr.shape[1:])) for arr in self._arrays]
        bounds = np.cumsum([0, *sizes])
        self._columns = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self._windows = [np.zeros((self._chunk, int(bounds[-1])), dtype=np.float32) for _ in range(2)]
        keepbits = spec.keepbits if spec.mode == "compact" else None
        self._round = None if keepbits is None else numcodecs.BitRound(keepbits)
        self._carry: np.ndarray | None = None  # compact: the rounding error, carried into the next step
        if self._round is not None:
            self._carry = np.zeros(int(bounds[-1]), dtype=np.float32)

    @property
    def factored(self) -> tuple[str, ...] | None:
        """``storage="factored"``: the layers stored as per-example factors (None: not decided yet)."""
        return self._spec.factored

    def set_factored(self, layers: Sequence[str]) -> None:
        """Store these layers' weights as per-example factors from now on (before the first step only).

        Creates the factor arrays, records the choice in the trace's attributes and only then
        removes the layers' dense weight arrays, so a crash in between leaves a readable trace.
        """
        if self.committed or self._pending or not self._queue.empty():
            raise RuntimeError("The factored layers are chosen before the first step is recorded.")
        compressor = self._group[schema.step_path("global_step")].compressors
        shapes = {lay.name: lay.params["weight"] for lay in self._spec.layers if lay.name in layers}
        for name, (out_features, in_features) in shapes.items():
            for side, width in (("in", in_features), ("out", out_features)):
                self._group.create_array(
                    schema.factor_path(name, side),
                    shape=(0, width),
                    chunks=(schema.factor_chunk(width), width),
                    dtype="float32",
                    compressors=compressor,
                    overwrite=True,
                )
        spec = dataclasses.replace(self._spec, factored=tuple(layers))
        self._group.attrs.update({"storage": spec.to_attrs()["storage"]})
        for name in layers:
            if schema.delta_path(name, "weight") in _member_names(self._group):
                del self._group[schema.delta_path(name, "weight")]
        self._layout(spec)

    # ---- training thread

    def put(self, record: StepRecord) -> None:
        """Queue a step (blocks while ``max_pending`` steps wait: backpressure)."""
        self._raise_if_failed()
        self._queue.put(record)

    def flush(self, *, wait: bool = True) -> None:
        """Commit every queued step; with ``wait`` return only once it is committed."""
        self._raise_if_failed()
        item = _Flush()
        self._queue.put(item)
        if wait:
            item.done.wait()
            self._raise_if_failed()

    def close(self, *, raise_errors: bool = True) -> None:
        """Commit what is queued, stop both threads and trim the arrays to the committed steps."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if raise_errors:
            self._raise_if_failed()

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
        last_commit = time.monotonic()
        while True:
            timeout = None
            if self._pending and self._error is None:
                timeout = max(0.0, self._commit_every_s - (time.monotonic() - last_commit))
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._submit()
                last_commit = time.monotonic()
                continue
            if item is _STOP or isinstance(item, _Flush):
                self._submit()
                _wait(self._committer.submit(_noop))  # commits run in order: this one ends after all of them
                if item is _STOP:
                    _wait(self._committer.submit(self._guard, self.tidy))
                    self._committer.shutdown()
                    return
                item.done.set()
                last_commit = time.monotonic()
                continue
            if self._error is not None:  # keep draining so the training thread never blocks forever
                if item.deltas is not None:
                    item.deltas.release()
                continue
            self._guard(self._append, item)
            if len(self._pending) == self._capacity:
                self._submit()
                last_commit = time.monotonic()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as exc:  # reported to the training thread by the next put/flush
            self._error = exc

    @property
    def _capacity(self) -> int:
        return self._chunk - self._start % self._chunk

    def _rounded(self, delta: np.ndarray) -> np.ndarray:
        """``storage="compact"``: the delta plus the previous rounding error, rounded; keeps the new error."""
        value = delta + self._carry
        stored = self._round.encode(value).view(np.float32)  # type: ignore[union-attr]
        self._carry = value - stored
        return stored

    def _append(self, record: StepRecord) -> None:
        row = len(self._pending)
        window = self._windows[self._current]
        if row == 0:  # the window's previous commit must have read it before it is refilled
            _wait(self._window_commit[self._current])
            window.fill(0.0)  # rows not yet filled are written as zeros by a partial commit
        if record.deltas is not None:
            try:
                delta = record.deltas.array()
                window[row] = delta if self._round is None else self._rounded(delta)
            finally:
                record.deltas.release()
            record.deltas = _IN_WINDOW  # the data now lives in the window
        self._pending.append(record)

    def _submit(self) -> Future[None] | None:
        """Hand the current window's pending steps to the committer; start a new window when it is full."""
        n = len(self._pending)
        if n == 0 or self._error is not None:
            return None
        # A chunk-aligned window is written whole, so zarr never reads back and decodes a partly written
        # chunk; rows past the committed ones are zeros or later steps, and readers ignore them.
        window = self._windows[self._current][: self._chunk if self._start % self._chunk == 0 else n]
        data = [
            window[:, cols].reshape(len(window), *arr.shape[1:])
            for cols, arr in zip(self._columns, self._arrays, strict=True)
        ]
        job = (self._start, self._example_start, list(self._pending), data)
        future = self._committer.submit(self._guard, self._commit, *job)
        self._window_commit[self._current] = future
        if n == self._capacity:
            self._start += n
            self._example_start += sum(len(r.index) for r in self._pending)
            self._pending = []
            self._current = 1 - self._current
        return future

    # ---- committer thread (commits run one at a time, in order; none runs after a failure)

    def _commit(self, start: int, e_start: int, recs: list[StepRecord], data: list[np.ndarray]) -> None:
        n = len(recs)
        counts = np.array([len(r.index) for r in recs], dtype=np.int64)
        e_stop = e_start + int(counts.sum())
        writes = [(arr, start, values) for arr, values in zip(self._arrays, data, strict=True)]
        columns = {
            "global_step": np.array([r.global_step for r in recs], dtype=np.int64),
            "epoch": np.array([r.epoch for r in recs], dtype=np.int64),
            "batch_idx": np.array([r.batch_idx for r in recs], dtype=np.int64),
            "skipped": np.array([r.skipped for r in recs], dtype=bool),
            "example_stop": e_start + np.cumsum(counts),
            "label": np.array([_step_label(r) for r in recs], dtype=np.int64),
            "lr": np.array([list(r.lr) for r in recs], dtype=np.float64).reshape(n, -1),
        }
        writes += [(self._steps[name], start, values) for name, values in columns.items()]
        if e_stop > e_start:
            writes += [
                (self._examples["index"], e_start, np.concatenate([r.index for r in recs])),
                (self._examples["ghost"], e_start, np.concatenate([r.ghost for r in recs])),
                (self._label_array(recs), e_start, _labels(recs)),
            ]
            for name, arrays in self._factors.items():
                for side, arr in enumerate(arrays):
                    writes.append((arr, e_start, _factor_rows(recs, name, side, arr.shape[1])))
        zarr_sync(_write_all(writes))  # data first, in one round trip to zarr's event loop ...
        self._group.attrs.update({"steps_committed": start + n, "examples_committed": e_stop})  # ... then the commit
        self.committed = start + n

    def tidy(self) -> None:
        """Cut the arrays' shapes back to the committed rows (they grow ahead in whole chunks)."""
        truncate(self._group, self.committed)

    def _label_array(self, recs: list[StepRecord]) -> zarr.Array:
        if "label" not in self._examples:
            sample = next((r.label for r in recs if r.label is not None), None)
            dtype = "int64" if sample is None or sample.dtype.kind in "iub" else "float32"
            width = () if sample is None else sample.shape[1:]
            self._examples["label"] = self._group.create_array(
                schema.example_path("label"),
                shape=(0, *width),
                chunks=(schema.EXAMPLE_CHUNK, *width),
                dtype=dtype,
                fill_value=-1,
                compressors=self._examples["index"].compressors,
            )
        return self._examples["label"]


def _step_label(record: StepRecord) -> int:
    """The class of a single-class step: the one label of its real rows, else -1."""
    if record.label is None or record.label.ndim != 1 or record.label.dtype.kind not in "iub":
        return -1
    real = np.unique(record.label[~record.ghost])
    return int(real[0]) if len(real) == 1 else -1


def _factor_rows(recs: list[StepRecord], layer: str, side: int, width: int) -> np.ndarray:
    """One factor of a layer for all rows of ``recs``; a skipped step's rows are zeros (it changed nothing)."""
    parts = [
        r.factors[layer][side] if r.factors is not None else np.zeros((len(r.index), width), np.float32) for r in recs
    ]
    return np.concatenate(parts)


def _labels(recs: list[StepRecord]) -> np.ndarray:
    width = next((r.label.shape[1:] for r in recs if r.label is not None), ())
    parts = [r.label if r.label is not None else np.full((len(r.index), *width), -1) for r in recs]
    return np.concatenate(parts)


async def _write_all(writes: list[tuple[zarr.Array, int, np.ndarray]]) -> None:
    """Write row blocks into several arrays concurrently, growing each ahead of need.

    Arrays grow geometrically in whole chunks, so most commits write data only;
    rows past ``steps_committed`` are never read (readers trust the attribute).
    """
    grow = []
    for arr, start, values in writes:
        stop = start + len(values)
        if arr.shape[0] < stop:
            chunk = arr.chunks[0]
            length = -(-max(stop, 2 * arr.shape[0]) // chunk) * chunk
            grow.append(arr.async_array.resize((length, *arr.shape[1:])))
    await asyncio.gather(*grow)
    await asyncio.gather(*(arr.async_array.setitem(slice(s, s + len(v)), v) for arr, s, v in writes))


def _member_names(group: zarr.Group) -> set[str]:
    return {name for name, _ in _walk_arrays(group)}
