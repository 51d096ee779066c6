"""The trace: a Zarr v3 group of initial weights, per-step deltas and step metadata."""

from lightning_tracetrain.trace.reader import Examples, FactorRows, StepTable, Trace
from lightning_tracetrain.trace.schema import FORMAT_VERSION, ClassSpec, LayerSpec, TraceSpec

__all__ = ["FORMAT_VERSION", "ClassSpec", "Examples", "FactorRows", "LayerSpec", "StepTable", "Trace", "TraceSpec"]
