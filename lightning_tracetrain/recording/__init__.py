"""Recording a training run: a thin Lightning callback over a plain recorder.

- :mod:`~lightning_tracetrain.recording.callback`: :class:`TraceCallback`, Lightning's hooks only;
- :mod:`~lightning_tracetrain.recording.recorder`: :class:`TraceRecorder` (start, record, commit, close);
- :mod:`~lightning_tracetrain.recording.staging`: deltas off the device without blocking;
- :mod:`~lightning_tracetrain.recording.factored`: per-example factors under plain SGD;
- :mod:`~lightning_tracetrain.recording.layers`: which layers are traceable.
"""

from lightning_tracetrain.recording.callback import TraceCallback
from lightning_tracetrain.recording.layers import select_layers, traceable_layers
from lightning_tracetrain.recording.recorder import RecorderOptions, StepInfo, TraceRecorder

__all__ = ["RecorderOptions", "StepInfo", "TraceCallback", "TraceRecorder", "select_layers", "traceable_layers"]
