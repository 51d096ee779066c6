"""lightning_tracetrain: explain what a network learned by tracing its training process.

Implements Pfahler & Morik, "Explaining Deep Learning Representations by
Tracing the Training Process" (AAAI 2022) for PyTorch Lightning.
"""

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.callback import TraceCallback
from lightning_tracetrain.datamodule import SingleClassBatchesMixin
from lightning_tracetrain.exceptions import (
    MissingIndexError,
    TraceExistsError,
    TraceFormatError,
    TraceMismatchError,
    TraceTrainError,
    TraceWriteError,
    UnknownLayerError,
)
from lightning_tracetrain.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNormNodes,
    convert_batchnorm,
    set_ghost_mask,
)
from lightning_tracetrain.sampler import SingleClassBatchSampler
from lightning_tracetrain.trace import Trace

__version__ = "0.1.0"

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNormNodes",
    "IndexedDataset",
    "MissingIndexError",
    "SingleClassBatchSampler",
    "SingleClassBatchesMixin",
    "Trace",
    "TraceCallback",
    "TraceExistsError",
    "TraceFormatError",
    "TraceMismatchError",
    "TraceTrainError",
    "TraceWriteError",
    "UnknownLayerError",
    "__version__",
    "convert_batchnorm",
    "set_ghost_mask",
]
