"""CIFAR-10 from a local ``cifar-10-batches-py`` directory (never downloaded), as single-class batches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.workloads.data.base import WorkloadDataModule

_MEAN, _STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(WorkloadDataModule):
    """CIFAR-10 with the paper's batches: 88 real examples of one class plus 40 ghosts (4 per class).

    Args:
        root: Folder that contains ``cifar-10-batches-py`` (the python version of CIFAR-10).
        batch_size: Real examples per training batch.
        ghost_size: Ghost samples per training batch.
        single_class: Single-class batches (else ordinary shuffled batches of ``batch_size``).
        val_size: Training examples held out for validation.
        seed: Seed of the split and the batch schedule.
        num_workers: DataLoader worker processes.
        synthetic: Use this many random tensors of CIFAR-10's shape instead of the files
            (for smoke tests and benchmarks; torchvision checks the real files' MD5s).
    """

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 88,
        ghost_size: int = 40,
        single_class: bool = True,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 2,
        synthetic: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        hp = self.hparams
        if hp.synthetic:
            train, test = _synthetic(hp.synthetic, 0), _synthetic(max(10, hp.synthetic // 4), 1)
        else:
            train, test = _torchvision(Path(hp.root), train=True), _torchvision(Path(hp.root), train=False)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        val_size = min(hp.val_size, len(train) // 10)
        self.train_dataset = IndexedDataset(Subset(train, order[val_size:]))
        self.val_dataset = IndexedDataset(Subset(train, order[:val_size]))
        self.test_dataset = IndexedDataset(test)


def _synthetic(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10)


def _torchvision(root: Path, train: bool) -> Dataset:
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 is not at {folder}. Extract the python version of CIFAR-10 (cifar-10-python.tar.gz) so that "
            f"{folder} holds data_batch_1..5 and test_batch, or set data.root (--data.root DIR) to the folder that "
            "contains cifar-10-batches-py. Nothing is downloaded."
        )
    from torchvision import transforms
    from torchvision.datasets import CIFAR10

    normalize = [transforms.ToTensor(), transforms.Normalize(_MEAN, _STD)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return CIFAR10(str(root), train=train, download=False, transform=transforms.Compose(augment + normalize))
