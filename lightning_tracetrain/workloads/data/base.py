"""What the paper's datamodules share: single-class training batches, plain evaluation loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_tracetrain.batch import loader_class
from lightning_tracetrain.singleclass.mixin import SingleClassBatchesMixin


class WorkloadDataModule(SingleClassBatchesMixin, pl.LightningDataModule):
    """A datamodule whose ``setup`` sets ``train_dataset``, ``val_dataset`` and ``test_dataset``
    (batch protocol) and whose hyperparameters include ``batch_size``, ``ghost_size``,
    ``single_class``, ``seed`` and ``num_workers``.
    """

    train_dataset: Dataset
    val_dataset: Dataset
    test_dataset: Dataset
    eval_batch_size = 256

    def train_dataloader(self) -> Any:
        hp = self.hparams
        return self.training_dataloader(
            self.train_dataset, hp.batch_size, hp.ghost_size, single_class=hp.single_class, seed=hp.seed,
            num_workers=hp.num_workers,
        )  # fmt: skip

    def _eval_loader(self, dataset: Dataset) -> Any:
        return loader_class(dataset)(dataset, batch_size=self.eval_batch_size, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> Any:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> Any:
        return self._eval_loader(self.test_dataset)


def flip_labels(labels: Tensor, fraction: float, num_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Replace ``round(fraction * n)`` labels, chosen at random, by a different random class.

    Returns the new labels and the sorted positions that were flipped (every one of them differs).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be a share in [0, 1], got {fraction}.")
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))].sort().values
    shift = torch.randint(1, num_classes, (len(flipped),), generator=g)  # never 0: always another class
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


def paint_patch(x: Tensor, size: int = 2, value: float = 2.0) -> Tensor:
    """``x`` (``(N, C, H, W)``) with a ``size`` x ``size`` square of ``value`` in each image's bottom-left corner.

    The default is twice the brightest ink of digits scaled to ``[0, 1]``: a sticker the
    network can learn as a shortcut, in a corner where digits have almost no ink.
    """
    out = x.clone()
    out[..., -size:, :size] = value
    return out


def paint_shortcut(x: Tensor, labels: Tensor, cls: int, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Paint :func:`paint_patch` on ``round(fraction * n)`` random images of class ``cls`` (``n`` of them).

    Returns the new images and the sorted positions that carry the patch (all of class ``cls``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"shortcut must be a share in [0, 1], got {fraction}.")
    members = (labels == cls).nonzero().flatten()
    if fraction and not len(members):
        raise ValueError(f"shortcut_class {cls} has no training examples; pick one of {labels.unique().tolist()}.")
    g = torch.Generator().manual_seed(seed)
    painted = members[torch.randperm(len(members), generator=g)[: round(fraction * len(members))]].sort().values
    out = x.clone()
    out[painted] = paint_patch(x[painted])
    return out, painted
