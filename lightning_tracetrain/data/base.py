"""What the paper's datamodules share: single-class training batches, plain evaluation loaders."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import Dataset

from lightning_tracetrain.batch import loader_class
from lightning_tracetrain.datamodule import SingleClassBatchesMixin


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
