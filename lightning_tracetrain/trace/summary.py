"""A trace described in a few lines for people: what was traced, how many steps, how many bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.schema import StorageMode

if TYPE_CHECKING:
    from lightning_tracetrain.trace.reader import Trace


def stored_bytes(trace: Trace, layers: Sequence[str] | None = None) -> dict[str, int]:
    """Stored and raw (float32) bytes of the deltas (or factors) of the committed steps (``Trace.nbytes``)."""
    stored = raw = 0
    for lay in trace.spec.layers if layers is None else [trace.layer(name) for name in layers]:
        for p, shape in lay.params.items():
            raw += int(np.prod(shape)) * 4 * trace.num_steps
            if p == "weight" and trace.spec.is_factored(lay.name):
                paths = [schema.factor_path(lay.name, side) for side in ("in", "out")]
            elif p == "weight" and trace.spec.is_lowrank(lay.name):  # the residual is one weight, not a step
                paths = [schema.lowrank_path(lay.name, side) for side in ("out", "in")]
            else:
                paths = [schema.delta_path(lay.name, p)]
            stored += sum(int(trace._array(path).nbytes_stored()) for path in paths)
    return {"stored": stored, "raw": raw}


def summary(trace: Trace) -> str:
    """Model, steps, classes, bytes and layers of a trace (``Trace.summary()``)."""
    size = trace.nbytes()
    ratio = size["raw"] / size["stored"] if size["stored"] else float("nan")
    steps = trace.steps
    lines = [
        f"Trace {trace.path}",
        f"  model   {trace.module.class_path}",
        f"  format  version {trace.attrs['format_version']} "
        f"({'a crc32c checksum on every chunk' if trace.attrs['format_version'] >= 2 else 'no checksums'})",
        f"  steps   {trace.num_steps} (epochs {int(steps.epoch.max()) + 1 if trace.num_steps else 0}, "
        f"skipped {int(steps.skipped.sum()) if trace.num_steps else 0})",
        f"  classes {_classes(trace)}",
        f"  deltas  {format_bytes(size['stored'])} on disk, {format_bytes(size['raw'])} as float32 "
        f"({ratio:.2f}x compression, {_storage(trace)})",
        "  layers",
    ]
    if steps.nonfinite.any():
        first = int(steps.global_step[np.flatnonzero(steps.nonfinite)[0]])
        lines.insert(4, f"  diverged at global step {first}: it changed the weights by NaN or infinity")
    for lay in trace.spec.layers:
        shapes = ", ".join(f"{p} {'x'.join(map(str, s))}" for p, s in lay.params.items())
        lines.append(f"    {lay.name:<24} {lay.module_type.rsplit('.', 1)[-1]:<10} {shapes}")
    return "\n".join(lines)


def _storage(trace: Trace) -> str:
    if trace.storage == StorageMode.compact:
        return f"compact: {trace.spec.keepbits} mantissa bits"
    if trace.storage == StorageMode.factored:
        return f"factored: {', '.join(trace.spec.factored) or 'no layer'} as per-example factors"
    if trace.storage == StorageMode.lowrank:
        how = "with error feedback" if trace.spec.feedback else "residual unattributed"
        return f"lowrank: {', '.join(trace.spec.lowrank) or 'no layer'} as rank-{trace.spec.rank} products, {how}"
    return "lossless"


def _classes(trace: Trace) -> str:
    labels = trace.steps.label
    single = labels[labels >= 0]
    if not len(single):
        return "no single-class step (mixed batches)"
    ghosts = int(trace.examples.ghost.sum())
    return (
        f"{len(single)} of {len(labels)} steps single-class over {len(np.unique(single))} classes; {ghosts} ghost rows"
    )


def format_bytes(n: float) -> str:
    """``n`` bytes as a person reads them: ``512 B``, ``33.3 MiB``, ``1.5 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
