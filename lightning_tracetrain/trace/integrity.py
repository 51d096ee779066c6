"""Damaged data found, named and measured: which array, which chunk, which steps, what still can be used.

Version-2 traces store a crc32c checksum with every chunk, so a flipped or missing
byte fails when the chunk is read. This module turns such failures (and those of
version-1 chunks inside the compressor, and of unreadable metadata documents) into
a :class:`~lightning_tracetrain.TraceCorruptError`, and finds the first damaged
chunk of a read that failed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from lightning_tracetrain.exceptions import TraceCorruptError
from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.store import optional_array

if TYPE_CHECKING:
    from lightning_tracetrain.trace.reader import Trace

# what zarr raises for a damaged chunk or metadata document: a checksum mismatch (ValueError), a compressor
# that cannot decode (RuntimeError), a JSON document that does not parse (JSONDecodeError, UnicodeDecodeError)
DECODE_ERRORS = (ValueError, RuntimeError, json.JSONDecodeError, UnicodeDecodeError)

Rows = Callable[[int, int], str]  # rows [a, b) of an array -> what they are ("steps 8..11")


def open_array(group: zarr.Group, path: str, trace: str) -> zarr.Array:
    """The array at ``path``; its metadata document must parse."""
    try:
        return group[path]
    except DECODE_ERRORS as exc:
        raise TraceCorruptError(
            f"The trace at {trace} is damaged: the metadata document of {path} cannot be read ({_reason(exc)}), so "
            f"none of its data can be located. {_advice(trace)}"
        ) from exc


def read(array: zarr.Array, path: str, rows: Any, what: Rows, trace: str) -> np.ndarray:
    """``array[rows]``; a damaged chunk becomes a TraceCorruptError naming it and the steps it holds."""
    try:
        return array[rows]
    except DECODE_ERRORS as exc:
        whole = rows is Ellipsis or array.ndim == 0
        start = 0 if whole else rows.start or 0
        stop = (array.shape[0] if array.ndim else 1) if whole or rows.stop is None else rows.stop
        first, last, cause = first_damaged_chunk(array, start, stop) or (start, stop, exc)
        chunk = first // array.chunks[0] if array.ndim else 0
        raise TraceCorruptError(
            f"The trace at {trace} is damaged: chunk {chunk} of {path} ({what(first, last)}) cannot be read "
            f"({_reason(cause)}). {_intact(path, first, what)}{_advice(trace)}"
        ) from exc


def split_rows(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` split at the boundaries of chunks of ``size`` rows."""
    bounds = [start, *range((start // size + 1) * size, stop, size), stop]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def chunk_ranges(array: zarr.Array, start: int, stop: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` of ``array`` split at its chunks' boundaries (axis 0)."""
    return [(0, 1)] if array.ndim == 0 else split_rows(start, stop, array.chunks[0])


def first_damaged_chunk(array: zarr.Array, start: int, stop: int) -> tuple[int, int, Exception] | None:
    """The rows of the first chunk in ``[start, stop)`` that cannot be read, and why; None when all can."""
    for a, b in chunk_ranges(array, start, stop):
        try:
            array[...] if array.ndim == 0 else array[a:b]
        except DECODE_ERRORS as exc:
            return a, b, exc
    return None


def _intact(path: str, first: int, what: Rows) -> str:
    if "/initial/" in path:
        return "Without the initial weights no weights can be rebuilt from this trace. "
    return (
        f"Rows before {first} of this array ({what(0, first)}) are intact as far as this read goes. " if first else ""
    )


def _advice(trace: str) -> str:
    return (
        f"`python -m lightning_tracetrain.trace verify {trace}` lists all damage, and with --repair keeps a copy "
        "cut back to its last intact step."
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "its checksum does not match" if "checksum" in text else f"{type(exc).__name__}: {text[:120]}"


def check_counters(trace: Trace) -> None:
    """The committed counters of an opened trace must describe data that exists: else ``trace._corrupt`` names
    the field (a TraceCorruptError)."""
    attrs = trace.attrs
    for field in ("steps_committed", "examples_committed"):
        value = attrs.get(field, 0)
        if type(value) is not int or value < 0:
            trace._corrupt(f"its counter {field} is {value!r}, not a non-negative integer")
    steps, examples = int(attrs["steps_committed"]), int(attrs.get("examples_committed", 0))
    optional = {schema.example_path("label")}  # labels are created with the first labelled rows
    if attrs["format_version"] == 1:
        optional |= {schema.step_path(name) for name in schema.NEW_IN_VERSION_2}
    for path in trace.spec.step_axis_paths():
        try:
            array = optional_array(trace._group, path)
        except DECODE_ERRORS:
            array = trace._array(path)  # raises the TraceCorruptError that names it
        if array is None:
            if path not in optional:
                trace._corrupt(f"its array {path} is missing")
            continue
        trace._arrays[path] = array
        rows, what = (examples, "example rows") if schema.is_example_axis(path) else (steps, "steps")
        if array.shape[0] < rows:
            trace._corrupt(f"{path} holds {array.shape[0]} rows, fewer than the {rows} committed {what}")
    table = trace.steps
    if len(table.example_stop) and (np.diff(table.example_stop, prepend=0) < 0).any():
        trace._corrupt("steps/example_stop decreases, so steps would own negative numbers of example rows")
    if steps and int(table.example_stop[-1]) != examples:
        trace._corrupt(
            f"steps/example_stop ends at row {int(table.example_stop[-1])}, but examples_committed is {examples}"
        )
    if steps > 1 and (np.diff(table.global_step) != 1).any():
        first = int(np.flatnonzero(np.diff(table.global_step) != 1)[0])
        trace._corrupt(
            f"steps/global_step jumps from {int(table.global_step[first])} to {int(table.global_step[first + 1])} "
            f"after committed step {first}, but every optimizer step is recorded"
        )
