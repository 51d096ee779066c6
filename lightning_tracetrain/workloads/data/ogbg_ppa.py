"""ogbg-ppa (protein association graphs of 37 taxonomic groups) from a local OGB root, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.workloads.data.base import WorkloadDataModule


def _zero_node_features(data: Any) -> Any:
    """ppa nodes have no features: every node gets category 0 for the node embedding (as in OGB's example)."""
    data.x = torch.zeros(data.num_nodes, dtype=torch.long)
    return data


def load_ogbg_ppa(root: str | Path) -> Any:
    """``PygGraphPropPredDataset('ogbg-ppa', root)`` without any download or prompt.

    Needs ``root/ogbg_ppa/`` with ``RELEASE_v1.txt``, ``raw/{edge,edge-feat,num-node-list,num-edge-list,
    graph-label}.csv.gz`` and ``split/species/{train,valid,test}.csv.gz``.
    """
    folder = Path(root) / "ogbg_ppa"
    missing = [
        p for p in ("RELEASE_v1.txt", "raw/edge.csv.gz", "split/species/train.csv.gz") if not (folder / p).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"ogbg-ppa is not at {folder} (missing {', '.join(missing)}). Unpack OGB's ogbg_ppa dataset there "
            "(RELEASE_v1.txt, raw/*.csv.gz, split/species/*.csv.gz), or set data.root (--data.root DIR) to the "
            "folder that contains ogbg_ppa. Nothing is downloaded."
        )
    from ogb.graphproppred import PygGraphPropPredDataset
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    # OGB loads its processed file with torch.load, which needs PyG's classes allowed under torch>=2.6 (ogb #497)
    with torch.serialization.safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage]):
        return PygGraphPropPredDataset("ogbg-ppa", root=str(root), transform=_zero_node_features)


class OgbgPpaDataModule(WorkloadDataModule):
    """ogbg-ppa with OGB's species split; single-class training batches (classes are imbalanced).

    Args:
        root: Folder that contains ``ogbg_ppa`` (OGB's layout).
        batch_size: Real graphs per training batch (the paper: 32).
        ghost_size: Ghost graphs per training batch, for ghost batch norm over their nodes.
        single_class: Single-class batches (else shuffled batches of ``batch_size``).
        seed: Seed of the batch schedule.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str = "data/ogb",
        batch_size: int = 32,
        ghost_size: int = 16,
        single_class: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 37

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        dataset = load_ogbg_ppa(self.hparams.root)
        split = dataset.get_idx_split()
        self.train_dataset = IndexedDataset(dataset[split["train"]])
        self.val_dataset = IndexedDataset(dataset[split["valid"]])
        self.test_dataset = IndexedDataset(dataset[split["test"]])


def ogb_accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Accuracy by OGB's own ``Evaluator('ogbg-ppa')``."""
    from ogb.graphproppred import Evaluator

    result = Evaluator("ogbg-ppa").eval(
        {"y_true": y_true.reshape(-1, 1).cpu().numpy(), "y_pred": y_pred.reshape(-1, 1).cpu().numpy()}
    )
    return float(np.asarray(result["acc"]))
