"""The trace: a Zarr v3 group of initial weights, per-step deltas and step metadata.

- :mod:`~lightning_tracetrain.trace.schema`: the on-disk layout and :class:`TraceSpec`;
- :mod:`~lightning_tracetrain.trace.codecs`: which compressor;
- :mod:`~lightning_tracetrain.trace.store`: create, reopen to resume, cut back;
- :mod:`~lightning_tracetrain.trace.writer`: the background commit engine (``background``: its threads' helpers);
- :mod:`~lightning_tracetrain.trace.reader` and :mod:`~lightning_tracetrain.trace.tables`: :class:`Trace`.
"""

from lightning_tracetrain.trace.reader import Trace
from lightning_tracetrain.trace.schema import FORMAT_VERSION, ClassSpec, LayerSpec, StorageMode, TraceSpec
from lightning_tracetrain.trace.tables import Examples, FactorRows, LowRankFactors, StepTable

__all__ = [
    "FORMAT_VERSION",
    "ClassSpec",
    "Examples",
    "FactorRows",
    "LayerSpec",
    "LowRankFactors",
    "StepTable",
    "StorageMode",
    "Trace",
    "TraceSpec",
]
