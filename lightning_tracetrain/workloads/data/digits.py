"""scikit-learn's handwritten digits (1,797 8x8 images shipped with the package): the embedded default data."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.workloads.data.base import WorkloadDataModule, flip_labels, paint_shortcut


class DigitsDataModule(WorkloadDataModule):
    """Digits as ``(1, 8, 8)`` images in ``[0, 1]``, split stratified into train/val/test.

    Batches follow the batch protocol (``x``, ``y``, ``index``); ``index`` is the
    position in the split's dataset, e.g. ``datamodule.train_dataset[index]``.

    Args:
        batch_size: Training batch size.
        val_fraction: Share of all examples held out for validation.
        test_fraction: Share of all examples held out for testing.
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader worker processes.
        single_class: Train on single-class batches (``batch_size`` real rows of one class).
        ghost_size: Ghost samples added to each single-class batch.
        label_noise: Share of training labels replaced by a different, random class (seeded by ``seed``),
            for mislabel-detection benchmarks; the flipped ids are in ``flipped`` after ``setup``.
        shortcut: Share of ``shortcut_class``'s training images that get a bright 2x2 patch in the
            bottom-left corner (:func:`~lightning_tracetrain.workloads.data.base.paint_patch`), for
            shortcut-detection benchmarks; their ids are in ``shortcut_ids`` after ``setup``.
        shortcut_class: The class whose images carry the patch.
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        single_class: bool = False,
        ghost_size: int = 0,
        label_noise: float = 0.0,
        shortcut: float = 0.0,
        shortcut_class: int = 6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        hp = self.hparams
        rest, test = train_test_split(idx, test_size=hp.test_fraction, stratify=y, random_state=hp.seed)
        val_share = hp.val_fraction / (1.0 - hp.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=hp.seed)
        y_train, self.flipped = flip_labels(y[train], hp.label_noise, self.num_classes, hp.seed)
        x_train, self.shortcut_ids = paint_shortcut(x[train], y_train, hp.shortcut_class, hp.shortcut, hp.seed)
        self.train_dataset = IndexedDataset(TensorDataset(x_train, y_train))
        self.val_dataset = IndexedDataset(TensorDataset(x[val], y[val]))
        self.test_dataset = IndexedDataset(TensorDataset(x[test], y[test]))
