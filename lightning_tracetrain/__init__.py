"""lightning_tracetrain: explain what a network learned by tracing its training process.

Implements Pfahler & Morik, "Explaining Deep Learning Representations by
Tracing the Training Process" (AAAI 2022) for PyTorch Lightning.

- :mod:`~lightning_tracetrain.functional`: the math, as plain tensor functions;
- :mod:`~lightning_tracetrain.trace`: the on-disk trace, its writer and :class:`Trace`;
- :mod:`~lightning_tracetrain.recording`: :class:`TraceCallback` over a plain recorder;
- :mod:`~lightning_tracetrain.singleclass`: single-class batches with ghost samples, ghost batch norm;
- :mod:`~lightning_tracetrain.explain`: the :class:`~lightning_tracetrain.explain.Explainer` and its CLI;
- :mod:`~lightning_tracetrain.baselines`: Representer Points, TracIn, ClaDec;
- :mod:`~lightning_tracetrain.workloads`: the paper's workloads (not imported by the library).
"""

from lightning_tracetrain._version import __version__
from lightning_tracetrain.batch import IndexedDataset, IndexedPair
from lightning_tracetrain.exceptions import (
    MissingIndexError,
    TraceBusyError,
    TraceCorruptError,
    TraceDivergedError,
    TraceExistsError,
    TraceFormatError,
    TraceMismatchError,
    TraceTrainError,
    TraceWriteError,
    UnknownConfigError,
    UnknownLayerError,
    UntrustedCodeError,
)
from lightning_tracetrain.recording import TraceCallback
from lightning_tracetrain.singleclass import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNormNodes,
    SingleClassBatchesMixin,
    SingleClassBatchSampler,
    convert_batchnorm,
    set_ghost_mask,
)
from lightning_tracetrain.trace import StorageMode, Trace

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNormNodes",
    "IndexedDataset",
    "IndexedPair",
    "MissingIndexError",
    "SingleClassBatchSampler",
    "SingleClassBatchesMixin",
    "StorageMode",
    "Trace",
    "TraceBusyError",
    "TraceCallback",
    "TraceCorruptError",
    "TraceDivergedError",
    "TraceExistsError",
    "TraceFormatError",
    "TraceMismatchError",
    "TraceTrainError",
    "TraceWriteError",
    "UnknownConfigError",
    "UnknownLayerError",
    "UntrustedCodeError",
    "__version__",
    "convert_batchnorm",
    "set_ghost_mask",
]
