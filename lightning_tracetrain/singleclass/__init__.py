"""The paper's mini-batch protocol: single-class batches with ghost samples, and ghost-sample batch norm.

- :mod:`~lightning_tracetrain.singleclass.sampler`: :class:`SingleClassBatchSampler`;
- :mod:`~lightning_tracetrain.singleclass.mixin`: :class:`SingleClassBatchesMixin` for a LightningDataModule;
- :mod:`~lightning_tracetrain.singleclass.ghost`: ghost batch norm modules (Algorithm 2, corrected;
  the statistics are :func:`~lightning_tracetrain.functional.ghost_moments`).
"""

from lightning_tracetrain.singleclass.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNormNodes,
    convert_batchnorm,
    ghost_masks,
    set_ghost_mask,
)
from lightning_tracetrain.singleclass.mixin import SingleClassBatchesMixin
from lightning_tracetrain.singleclass.sampler import SingleClassBatchSampler, dataset_labels

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNormNodes",
    "SingleClassBatchSampler",
    "SingleClassBatchesMixin",
    "convert_batchnorm",
    "dataset_labels",
    "ghost_masks",
    "set_ghost_mask",
]
