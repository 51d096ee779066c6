"""Single-class batches: the sampler, the datamodule mixin and what the trace records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from scipy.stats import chisquare
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.functional import real_cross_entropy
from lightning_tracetrain.singleclass import (
    GhostBatchNorm1d,
    SingleClassBatchesMixin,
    SingleClassBatchSampler,
    dataset_labels,
)

IMBALANCED = np.repeat(np.arange(4), [100, 7, 1, 40])  # like ogbg-ppa, some classes are tiny


def _epoch(sampler: SingleClassBatchSampler) -> list[list[tuple[int, bool]]]:
    return list(sampler)


@pytest.mark.parametrize("labels", [np.repeat(np.arange(3), 20), IMBALANCED])
def test_every_example_once_per_epoch_as_a_real_row_of_a_one_class_batch(labels):
    sampler = SingleClassBatchSampler(labels, batch_size=8, ghost_size=5, seed=1)
    for _ in range(2):  # two epochs
        batches = _epoch(sampler)
        assert len(batches) == len(sampler)
        real = []
        for batch in batches:
            flags = [g for _, g in batch]
            n_real = flags.count(False)
            assert flags == [False] * n_real + [True] * 5  # real rows first, then the ghosts
            assert 1 <= n_real <= 8
            ids = [i for i, g in batch if not g]
            assert len(set(labels[ids])) == 1  # one class per batch
            real += ids
        assert sorted(real) == list(range(len(labels)))  # nothing dropped, nothing twice


def test_ghost_classes_follow_the_prior():
    sampler = SingleClassBatchSampler(IMBALANCED, batch_size=8, ghost_size=10, seed=3)
    counts = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            ghosts = [i for i, g in batch if g]
            per_class = Counter(IMBALANCED[ghosts].tolist())
            for c, prior in enumerate(sampler.prior):  # stratified: floor or ceil of the expected count
                assert int(np.floor(10 * prior)) <= per_class[c] <= int(np.ceil(10 * prior))
            counts.update(per_class)
    observed = np.array([counts[c] for c in range(4)], dtype=float)
    expected = observed.sum() * sampler.prior
    assert chisquare(observed, expected).pvalue > 0.01
    np.testing.assert_allclose(observed / observed.sum(), sampler.prior, atol=0.01)


def test_schedule_is_reproducible_and_changes_with_the_epoch():
    a = SingleClassBatchSampler(IMBALANCED, batch_size=8, ghost_size=4, seed=5)
    b = SingleClassBatchSampler(IMBALANCED, batch_size=8, ghost_size=4, seed=5)
    first = _epoch(a)
    assert first == _epoch(b)
    second = _epoch(a)  # the epoch advances by itself without Lightning
    assert second != first
    a.set_epoch(0)
    assert _epoch(a) == first
    assert _epoch(SingleClassBatchSampler(IMBALANCED, batch_size=8, ghost_size=4, seed=6)) != first


def test_replicas_share_the_class_sequence_on_disjoint_examples():
    ranks = [SingleClassBatchSampler(IMBALANCED, 4, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    epochs = [_epoch(s) for s in ranks]
    assert len(epochs[0]) == len(epochs[1])
    union = []
    for b0, b1 in zip(*epochs, strict=True):
        real0, real1 = [i for i, g in b0 if not g], [i for i, g in b1 if not g]
        assert set(IMBALANCED[real0 + real1].tolist()) == set(IMBALANCED[real0[:1] or real1[:1]].tolist())
        assert not set(real0) & set(real1)
        union += real0 + real1
    assert sorted(union) == list(range(len(IMBALANCED)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="integer class labels"):
        SingleClassBatchSampler(np.array([0.5, 1.0]), batch_size=2)
    with pytest.raises(ValueError, match=r"rank 2 is outside 0\.\.1"):
        SingleClassBatchSampler([0, 1], batch_size=2, num_replicas=2, rank=2)


def test_dataset_labels_fast_path_and_fallback():
    ds = TensorDataset(torch.zeros(5, 2), torch.tensor([3, 1, 4, 1, 5]))
    np.testing.assert_array_equal(dataset_labels(ds), [3, 1, 4, 1, 5])
    items = [{"x": torch.zeros(2), "y": torch.tensor([c])} for c in (2, 7)]
    np.testing.assert_array_equal(dataset_labels(items), [2, 7])


class Blobs(SingleClassBatchesMixin, pl.LightningDataModule):
    def __init__(self, ghost_size: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.tensor([0] * 12 + [1] * 9 + [2] * 5)
        self.train_set = TensorDataset(torch.randn(len(y), 4, generator=g) + y[:, None], y)
        self.ghost_size = ghost_size

    def train_dataloader(self) -> Any:
        return self.single_class_dataloader(self.train_set, batch_size=4, ghost_size=self.ghost_size, seed=2)


class SeqNet(pl.LightningModule):
    """An nn.Sequential with a ghost batch norm: the mixin must hand it the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), GhostBatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.masks: list[Tensor | None] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.masks.append(self.net[1].ghost_mask)
        return real_cross_entropy(self.net(batch["x"]), batch["y"], batch["ghost"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trace_records_class_real_and_ghost_ids_of_each_step(tmp_path):
    model, dm = SeqNet(), Blobs()
    trainer = quiet_trainer(max_epochs=2, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(model, dm)
    assert all(m is not None and m.sum() == 3 for m in model.masks)  # the mixin set the mask every batch
    trace = Trace(tmp_path / "t")
    labels = dm.train_set.tensors[1].numpy()
    assert trace.num_steps == trainer.global_step == 2 * (3 + 3 + 2)
    for t in range(trace.num_steps):
        real, ghosts = trace.real_examples(t), trace.ghost_examples(t)
        assert len(ghosts) == 3 and 1 <= len(real) <= 4
        assert set(labels[real].tolist()) == {trace.steps.label[t]}
        np.testing.assert_array_equal(trace.step_examples(t).label, labels[trace.step_examples(t).index])
    for epoch in range(2):
        steps = np.flatnonzero(trace.steps.epoch == epoch)
        assert sorted(np.concatenate([trace.real_examples(t) for t in steps]).tolist()) == list(range(26))


@pytest.mark.slow
def test_two_process_ddp_shares_the_class_sequence_on_disjoint_examples(tmp_path):
    script = Path(__file__).with_name("single_class_run.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--devices", "2"],
        capture_output=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert len(rank0) == len(rank1) > 0
    for s0, s1 in zip(rank0, rank1, strict=True):
        assert s0["classes"] == s1["classes"] and len(s0["classes"]) == 1  # same class at the same step
        assert not set(s0["real"]) & set(s1["real"])  # on disjoint examples
        assert s0["real_first"] and s1["real_first"] and len(s0["ghost"]) == len(s1["ghost"]) == 3
    per_epoch = len(rank0) // 2
    for e in range(2):
        steps = slice(e * per_epoch, (e + 1) * per_epoch)
        ids = [i for s in rank0[steps] + rank1[steps] for i in s["real"]]
        assert sorted(ids) == list(range(52))
    trace = Trace(tmp_path / "trace")  # rank 0 records both ranks' real and ghost ids, one record per step
    assert trace.num_steps == len(rank0)
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(len(rank0)))
    for t, (s0, s1) in enumerate(zip(rank0, rank1, strict=True)):
        assert sorted(trace.real_examples(t).tolist()) == sorted(s0["real"] + s1["real"])
        assert sorted(trace.ghost_examples(t).tolist()) == sorted(s0["ghost"] + s1["ghost"])
    final = torch.load(tmp_path / "final.pt")  # rank 0's weights after the last step: what the trace adds up to
    for layer in trace.layers:
        for param, value in trace.final(layer).items():
            torch.testing.assert_close(value, final[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)
