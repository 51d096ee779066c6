"""Will the trace fit? A projection of its size at fit start, against the free space where it goes.

A user should learn that a trace will not fit before the disk fills, not when
it does. At fit start the recorder knows the traced layers and the trainer
knows how many optimizer steps the run will take, so the size is bounded: a
lossless step stores each traced parameter's change as float32, which Blosc
with lz4 shrinks by 1.4-1.8x on the runs we measured (never 2x); ``compact``
keeps about a quarter of that; ``lowrank`` stores each chosen weight's two factors
instead of its delta. A warning, not an error: a run may be stopped early.
``python -m lightning_tracetrain plan`` measures instead of bounding.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.recording.layers import layer_parameters
from lightning_tracetrain.recording.lowrank import choose_lowrank
from lightning_tracetrain.trace import StorageMode
from lightning_tracetrain.trace.store import is_url
from lightning_tracetrain.trace.summary import format_bytes

BEST_LOSSLESS_COMPRESSION = 2.0  # float32 deltas through lz4 + shuffle: 1.4-1.8x measured; 2x as a lower bound
COMPACT_SHARE = 0.25  # storage="compact" stores about a quarter of float32


def step_bytes(layers: Mapping[str, nn.Module], mode: str, rank: int = 8) -> dict[str, int]:
    """float32 bytes one step stores per layer: every parameter's delta, or under ``lowrank`` a chosen weight's
    two factors (``rank * (out + in * kernel)`` values) in place of its delta."""
    chosen = choose_lowrank({n: m.weight.shape for n, m in layers.items()}, rank) if mode == StorageMode.lowrank else ()
    out = {}
    for name, module in layers.items():
        total = 0
        for param, t in layer_parameters(module).items():
            lowrank = param == "weight" and name in chosen
            total += rank * sum(Fx.matrix_shape(t.shape)) if lowrank else t.numel()
        out[name] = 4 * total
    return out


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


def space_warning(
    layer_bytes: Mapping[str, int], steps: float, mode: str, dirpath: str, lowrank_bytes: float | None = None
) -> str | None:
    """A warning when even the smallest projection of the trace exceeds the free space at ``dirpath``, naming
    what would fit; None when it fits or cannot be projected (unbounded run, object storage, factored).
    ``lowrank_bytes``: what a step would store with ``storage='lowrank'``, to say whether that would fit."""
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
    if mode != StorageMode.lowrank and lowrank_bytes is not None and lowrank_bytes * steps / 2 <= free:
        fits.append("storage='lowrank' (rank-8 products of each step, see `python -m lightning_tracetrain plan`)")
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
