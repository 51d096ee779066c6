"""A LightningDataModule mixin for single-class training batches with ghost samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tracetrain.batch import IndexedDataset, loader_class
from lightning_tracetrain.singleclass.ghost import set_ghost_mask
from lightning_tracetrain.singleclass.sampler import SingleClassBatchSampler, dataset_labels


class SingleClassBatchesMixin:
    """Give a ``LightningDataModule`` single-class training batches with one line.

    Example:
        >>> import lightning.pytorch as pl
        >>> class MyData(SingleClassBatchesMixin, pl.LightningDataModule):
        ...     def train_dataloader(self):
        ...         return self.single_class_dataloader(self.train_set, batch_size=32, ghost_size=10)

    Batches follow the batch protocol with a ``ghost`` mask (real rows first);
    compute the loss with :func:`~lightning_tracetrain.functional.real_cross_entropy`.
    Before each training batch reaches the model, the mixin hands its ghost
    mask to every ghost batch norm of the LightningModule (and clears it for
    validation and test batches), so plain ``nn.Sequential`` models work.

    Under DDP the sampler shards by rank itself: every rank trains on the same
    class at the same step, on disjoint examples. Lightning must not replace
    it, so use ``Trainer(use_distributed_sampler=False)`` (otherwise Lightning
    stops with an error that says so).
    """

    trainer: Any

    def single_class_dataloader(
        self,
        dataset: Dataset,
        batch_size: int,
        ghost_size: int = 0,
        *,
        labels: Any = None,
        seed: int = 0,
        num_workers: int = 0,
        **loader_kwargs: Any,
    ) -> DataLoader:
        """A DataLoader of single-class batches with ghosts over ``dataset`` (ids: positions in it)."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        indexed = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        labels = dataset_labels(indexed) if labels is None else np.asarray(labels)
        sampler = SingleClassBatchSampler(labels, batch_size, ghost_size, seed=seed, num_replicas=world, rank=rank)
        return loader_class(indexed)(indexed, batch_sampler=sampler, num_workers=num_workers, **loader_kwargs)

    def training_dataloader(
        self,
        dataset: Dataset,
        batch_size: int,
        ghost_size: int = 0,
        *,
        single_class: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> DataLoader:
        """Single-class batches with ghosts, or (``single_class=False``) ordinary shuffled batches for comparison."""
        if single_class:
            return self.single_class_dataloader(dataset, batch_size, ghost_size, seed=seed, num_workers=num_workers)
        if ghost_size:
            raise ValueError("ghost_size needs single_class=True: ghosts complete single-class batches.")
        indexed = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
        generator = torch.Generator().manual_seed(seed)
        return loader_class(indexed)(
            indexed, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None)
        if module is not None:
            set_ghost_mask(module, batch if trainer.training else None)
        return batch
