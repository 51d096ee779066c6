"""Checking every committed chunk of a trace, and keeping what is intact.

:func:`verify` reads each array's metadata and every committed chunk (their
checksums are checked as they decode) and reports what is damaged and the last
intact step: the trace's first ``intact`` steps, with their examples, can all be
read. :func:`repair` copies a trace (or works in place) and cuts it back to that
step, so the copy opens and rebuilds the weights after its last intact step.
It works on the Zarr group directly, so it also reports damage that keeps
:class:`~lightning_tracetrain.Trace` from opening the trace at all.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr

from lightning_tracetrain.exceptions import TraceCorruptError, TraceFormatError
from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.integrity import DECODE_ERRORS, chunk_ranges, first_damaged_chunk
from lightning_tracetrain.trace.lease import Lease
from lightning_tracetrain.trace.schema import TraceSpec
from lightning_tracetrain.trace.store import is_url, open_group, optional_array, truncate


@dataclass(frozen=True)
class Damage:
    """One unreadable piece of a trace: an array's metadata (``rows`` None) or one of its chunks."""

    array: str
    rows: tuple[int, int] | None
    steps: tuple[int, int] | None  # the committed steps whose data it holds (None: all of them, or unknown)
    reason: str

    def describe(self) -> str:
        where = "its metadata" if self.rows is None else f"rows {self.rows[0]}..{self.rows[1] - 1}"
        if "/initial/" in self.array:
            where = "the initial weights"
        steps = "all steps" if self.steps is None else f"steps {self.steps[0]}..{self.steps[1] - 1}"
        return f"{self.array}: {where} ({steps}): {self.reason}"


@dataclass
class Verification:
    """What :func:`verify` found."""

    path: str
    steps: int  # committed steps (0 when the counters cannot be read)
    intact: int  # the first `intact` steps can be read whole
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def report(self) -> str:
        if self.ok:
            return f"{self.path}: {self.steps} committed steps, every chunk and metadata document intact."
        lines = [f"{self.path}: {len(self.damaged)} damaged, of {self.steps} committed steps:"]
        lines += [f"  {d.describe()}" for d in self.damaged]
        lines.append(f"the first {self.intact} steps are intact" if self.intact else "no step can be trusted")
        return "\n".join(lines)


def verify(path: str, storage_options: dict[str, Any] | None = None) -> Verification:
    """Read every metadata document and committed chunk of the trace at ``path``."""
    try:
        group = open_group(path, "r", storage_options)
        attrs = dict(group.attrs)
    except FileNotFoundError:
        raise TraceFormatError(f"No trace at {path}: the path does not exist or holds no Zarr group.") from None
    except DECODE_ERRORS as exc:
        return Verification(path, 0, 0, [Damage("zarr.json", None, None, f"unreadable ({type(exc).__name__})")])
    if attrs.get("format") != schema.FORMAT:
        raise TraceFormatError(f"{path} is a Zarr group but not a lightning_tracetrain trace.")
    spec = TraceSpec.from_attrs(attrs)
    steps, examples = attrs.get("steps_committed"), attrs.get("examples_committed", 0)
    if not all(type(v) is int and v >= 0 for v in (steps, examples)):
        counters = f"steps_committed={steps!r}, examples_committed={examples!r}"
        return Verification(path, 0, 0, [Damage("zarr.json", None, None, f"impossible counters: {counters}")])
    result = Verification(path, steps, steps)
    stops = _example_stops(group, steps)
    for layer in spec.layers:
        for param in layer.params:  # the initial weights: any damage leaves nothing to rebuild
            name = schema.initial_path(layer.name, param)
            array = _open(group, name, result)
            if array is not None and (error := _unreadable(array)) is not None:
                result.damaged.append(Damage(name, (0, array.shape[0]), None, _reason(error)))
    for name in spec.step_axis_paths():
        array = _open(group, name, result)
        if array is None:
            continue  # labels and version-2 arrays may be absent (Trace checks that when it opens the trace)
        rows = examples if schema.is_example_axis(name) else steps
        for first, last in chunk_ranges(array, 0, min(rows, array.shape[0])):
            if (found := first_damaged_chunk(array, first, last)) is not None:
                result.damaged.append(
                    Damage(name, (first, last), _steps_of(name, first, last, stops), _reason(found[2]))
                )
    for damage in result.damaged:  # the steps before the earliest damage can all be read
        result.intact = min(result.intact, 0 if damage.steps is None else damage.steps[0])
    return result


def repair(
    path: str, out: str | None = None, *, in_place: bool = False, storage_options: dict[str, Any] | None = None
) -> Verification:
    """Keep the trace up to its last intact step, in a copy at ``out`` (default ``PATH.repaired``) or in place.

    Returns the verification of the result (which must be clean).
    """
    found = verify(path, storage_options)
    if any(d.array == "zarr.json" for d in found.damaged):
        raise TraceCorruptError(f"{path} cannot be repaired: its metadata is damaged ({found.damaged[0].reason}).")
    target = path if in_place else (out or f"{path.rstrip('/')}.repaired")
    lease = Lease(target, storage_options)
    lease.acquire()  # in place: never under a live run's feet (TraceBusyError); a copy: no one else writes it
    try:
        if not in_place:
            _copy(path, target, storage_options)
        truncate(open_group(target, "r+", storage_options), found.intact)
    finally:
        lease.release()
    return verify(target, storage_options)


def _open(group: zarr.Group, name: str, result: Verification) -> zarr.Array | None:
    """The array, or None when it is absent or its metadata cannot be read (then noted in ``result``)."""
    try:
        return optional_array(group, name)
    except DECODE_ERRORS as exc:
        result.damaged.append(Damage(name, None, None, f"metadata unreadable ({type(exc).__name__})"))
        return None


def _reason(exc: Exception) -> str:
    return "checksum mismatch" if "checksum" in str(exc) else f"{type(exc).__name__}: {str(exc)[:80]}"


def _unreadable(array: zarr.Array) -> Exception | None:
    """Why the whole array cannot be read, or None."""
    try:
        array[...]
    except DECODE_ERRORS as exc:
        return exc
    return None


def _example_stops(group: zarr.Group, steps: int) -> np.ndarray | None:
    """``steps/example_stop`` if it can be read (it maps example rows to steps)."""
    try:
        return group[schema.step_path("example_stop")][:steps]
    except (*DECODE_ERRORS, KeyError):
        return None


def _steps_of(name: str, first: int, last: int, stops: np.ndarray | None) -> tuple[int, int] | None:
    """The committed steps that rows ``[first, last)`` of an array hold."""
    if not schema.is_example_axis(name):
        return first, last
    if stops is None:
        return None
    a, b = np.searchsorted(stops, [first, last - 1], side="right")
    return int(a), int(b) + 1


def _copy(source: str, target: str, storage_options: dict[str, Any] | None) -> None:
    if not is_url(source) and not is_url(target):
        shutil.copytree(source, target)
        return
    fs, src = fsspec.core.url_to_fs(source, **(storage_options or {}))
    fs.copy(src, fsspec.core.url_to_fs(target, **(storage_options or {}))[1], recursive=True)
