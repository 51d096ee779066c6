"""Will the trace fit? A projection of its size at fit start, against the free space where it goes.

A user should learn that a trace will not fit before the disk fills, not when
it does. At fit start the recorder knows the traced layers and the trainer
knows how many optimizer steps the run will take, so the size is bounded: a
lossless step stores each traced parameter's change as float32, which Blosc
with lz4 shrinks by 1.4-1.8x on the runs we measured (never 2x); ``compact``
keeps about a quarter of that. A warning, not an error: a run may be stopped early.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from lightning_tracetrain.trace import StorageMode
from lightning_tracetrain.trace.store import is_url
from lightning_tracetrain.trace.summary import format_bytes

BEST_LOSSLESS_COMPRESSION = 2.0  # float32 deltas through lz4 + shuffle: 1.4-1.8x measured; 2x as a lower bound
COMPACT_SHARE = 0.25  # storage="compact" stores about a quarter of float32


def projected_bytes(layer_bytes: Mapping[str, int], steps: int, mode: str) -> tuple[float, float]:
    """The smallest and largest size the deltas of ``steps`` steps will take: ``(low, high)`` in bytes."""
    raw = float(sum(layer_bytes.values())) * steps
    share = COMPACT_SHARE if mode == StorageMode.compact else 1.0
    return raw * share / BEST_LOSSLESS_COMPRESSION, raw * share


def free_bytes(dirpath: str) -> int | None:
    """Free space on the disk that will hold ``dirpath`` (its nearest existing parent); None for URLs."""
    if is_url(dirpath):
        return None
    path = Path(dirpath).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def space_warning(layer_bytes: Mapping[str, int], steps: float, mode: str, dirpath: str) -> str | None:
    """A warning when even the smallest projection of the trace exceeds the free space at ``dirpath``, naming
    what would fit; None when it fits or cannot be projected (unbounded run, object storage, factored)."""
    free = free_bytes(dirpath)
    if free is None or not math.isfinite(steps) or steps <= 0 or mode == StorageMode.factored:
        return None
    steps = int(steps)
    low, high = projected_bytes(layer_bytes, steps, mode)
    if low <= free:
        return None
    fits = []
    if mode != StorageMode.compact and projected_bytes(layer_bytes, steps, StorageMode.compact)[0] <= free:
        fits.append("storage='compact' (about a quarter of float32, 4 mantissa bits kept by default)")
    kept, total = [], 0.0
    for name, size in sorted(layer_bytes.items(), key=lambda kv: kv[1]):  # the smallest layers first
        total += projected_bytes({name: size}, steps, mode)[0]
        if total > free:
            break
        kept.append(name)
    if kept:
        fits.append(f"layers={kept}")
    advice = " or ".join(fits) if fits else "a disk with more free space (no choice of mode or layers fits)"
    return (
        f"TraceCallback: this run's trace will not fit at {dirpath}: {steps} steps of "
        f"{format_bytes(sum(layer_bytes.values()))} of float32 deltas need {format_bytes(low)} to {format_bytes(high)} "
        f"({mode}), and {format_bytes(free)} are free. It would fit with {advice}."
    )
