"""Single-class mini-batches with ghost samples (the paper's "Mini-Batch-Training").

Each batch holds up to ``batch_size`` examples of one class, so every optimizer
step can be attributed to one class and its examples, plus ``ghost_size``
ghost examples drawn from all classes by their prior, which only shape the
batch-norm statistics (:mod:`lightning_tracetrain.ghost`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset

from lightning_tracetrain.batch import IndexedDataset


class SingleClassBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Batches of one class (real rows first) followed by class-stratified ghost samples.

    One epoch uses every example exactly once as a real row: each class's
    examples are shuffled and split into ``ceil(n_c / (batch_size * replicas))``
    steps of nearly equal size (so no remainder is dropped and no batch exceeds
    ``batch_size``), and the steps of all classes are shuffled together.
    Ghosts are stratified by the class prior: class ``c`` gets ``ghost_size *
    prior_c`` ghosts, the fractional parts rounded by a random draw, so their
    expected frequencies are the prior exactly.

    Under DDP every replica draws the same schedule (same seed): at each step
    all ranks train on the same class, on disjoint examples, with ghosts of
    their own. Lightning calls :meth:`set_epoch`; without it, each pass over
    the sampler advances the epoch.

    Yields lists of ``(index, is_ghost)``, which :class:`~lightning_tracetrain.IndexedDataset`
    understands (its items then carry ``ghost``).

    Example:
        >>> sampler = SingleClassBatchSampler([0, 0, 0, 1, 1], batch_size=2, ghost_size=1, seed=0)
        >>> [len(b) for b in sampler]
        [3, 3, 2]
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        ghost_size: int = 0,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if labels.size == 0:
            raise ValueError("SingleClassBatchSampler needs at least one example.")
        if labels.dtype.kind not in "iub":
            raise ValueError(f"Single-class batches need integer class labels, got dtype {labels.dtype}.")
        if batch_size < 1 or ghost_size < 0:
            raise ValueError(f"batch_size must be >= 1 and ghost_size >= 0, got {batch_size} and {ghost_size}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}.")
        self.labels = labels.astype(np.int64)
        self.batch_size = batch_size
        self.ghost_size = ghost_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.classes = np.unique(self.labels)
        self.members = [np.flatnonzero(self.labels == c) for c in self.classes]
        self.prior = np.array([len(m) for m in self.members], dtype=np.float64) / len(self.labels)

    @property
    def sampler(self) -> SingleClassBatchSampler:
        """Lightning calls ``batch_sampler.sampler.set_epoch(epoch)`` at each epoch start."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self._steps_of(len(m)) for m in self.members)

    def _steps_of(self, n: int) -> int:
        return math.ceil(n / (self.batch_size * self.num_replicas))

    def schedule(self, epoch: int) -> list[tuple[int, list[np.ndarray]]]:
        """The epoch's steps, the same on every rank: ``(class, [real ids of rank 0, rank 1, ...])``."""
        rng = np.random.default_rng([self.seed, epoch])
        steps = []
        for cls, members in zip(self.classes, self.members, strict=True):
            k = self._steps_of(len(members))
            parts = np.array_split(rng.permutation(members), k * self.num_replicas)
            steps += [(int(cls), parts[s * self.num_replicas : (s + 1) * self.num_replicas]) for s in range(k)]
        return [steps[i] for i in rng.permutation(len(steps))]

    def ghosts(self, epoch: int, step: int) -> np.ndarray:
        """This rank's ghost ids for a step: ``ghost_size`` ids stratified by the class prior."""
        if self.ghost_size == 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, step, self.rank, 1])
        expected = self.ghost_size * self.prior
        counts = np.floor(expected).astype(np.int64)
        rest = self.ghost_size - int(counts.sum())
        if rest > 0:
            frac = expected - counts
            counts[rng.choice(len(counts), size=rest, replace=False, p=frac / frac.sum())] += 1
        ids = [
            rng.choice(members, size=count, replace=count > len(members))
            for members, count in zip(self.members, counts, strict=True)
            if count
        ]
        return rng.permutation(np.concatenate(ids))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        epoch = self.epoch
        for step, (_, parts) in enumerate(self.schedule(epoch)):
            real = parts[self.rank]
            yield [(int(i), False) for i in real] + [(int(i), True) for i in self.ghosts(epoch, step)]
        self.epoch = epoch + 1


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Integer class labels of every example of a dataset, read cheaply where possible.

    Looks through ``IndexedDataset`` and ``Subset`` wrappers at ``TensorDataset``
    tensors, ``targets`` (torchvision) and PyG in-memory datasets' stored ``y``
    before falling back to reading every item's ``y``.
    """
    inner: Any = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset
    if isinstance(inner, Subset):
        return dataset_labels(inner.dataset)[np.asarray(inner.indices)]
    if isinstance(inner, TensorDataset) and len(inner.tensors) >= 2:
        return inner.tensors[1].reshape(len(inner), -1)[:, 0].cpu().numpy()
    targets = getattr(inner, "targets", None)
    if targets is not None and len(targets) == len(inner):
        return np.asarray(targets).reshape(-1)
    stored = getattr(inner, "_data", None)  # a PyG InMemoryDataset (or a subset of one): one y per graph
    y = getattr(stored, "y", None) if stored is not None else None
    if isinstance(y, torch.Tensor) and hasattr(inner, "indices") and y.shape[0] == inner.len():
        return y.reshape(y.shape[0], -1)[:, 0][torch.as_tensor(list(inner.indices()))].cpu().numpy()
    labels = []
    for i in range(len(inner)):
        item = inner[i]
        y = item["y"] if isinstance(item, dict) else item[1] if isinstance(item, tuple | list) else item.y
        labels.append(int(torch.as_tensor(y).reshape(-1)[0]))
    return np.asarray(labels, dtype=np.int64)
