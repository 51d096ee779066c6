"""The batch protocol: ids through the default and the PyG collation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader as GraphLoader

from lightning_tracetrain import IndexedDataset, MissingIndexError
from lightning_tracetrain.batch import batch_ghost, batch_index, batch_labels


def test_tuple_dataset_batches_follow_the_protocol():
    ds = IndexedDataset(TensorDataset(torch.randn(10, 3), torch.arange(10) % 4))
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=[7, 2, 9, 0])))
    assert set(batch) == {"x", "y", "index"}
    assert batch_index(batch).tolist() == [7, 2, 9, 0]
    assert batch_labels(batch, 4).tolist() == [3, 2, 1, 0]
    assert batch_ghost(batch, 4).tolist() == [False] * 4


def test_mapping_items_keep_their_keys():
    ds = IndexedDataset([{"x": torch.zeros(2), "y": 1, "ghost": True}] * 3)
    item = ds[1]
    assert item["index"] == 1 and item["ghost"] is True


def test_graph_ids_are_not_offset_by_pyg_collation():
    graphs = [
        Data(x=torch.randn(3 + i, 2), edge_index=torch.tensor([[0, 1], [1, 2]]), y=torch.tensor([i])) for i in range(6)
    ]
    loader = GraphLoader(IndexedDataset(graphs), batch_size=3, shuffle=False)
    batches = list(loader)
    assert batch_index(batches[1]).tolist() == [3, 4, 5]
    assert batches[1].edge_index.max() > 2  # edge indices are still offset
    assert batch_labels(batches[1], 3).tolist() == [3, 4, 5]


def test_missing_or_float_ids_name_the_wrapper():
    with pytest.raises(MissingIndexError, match="IndexedDataset"):
        batch_index({"x": torch.zeros(2), "y": torch.zeros(2)})
    with pytest.raises(MissingIndexError, match="integer dataset ids"):
        batch_index({"index": torch.zeros(2)})


def test_items_without_a_label_are_rejected_clearly():
    with pytest.raises(TypeError, match=r"\(x, y\) tuples"):
        IndexedDataset([torch.zeros(3)])[0]


def test_multi_column_labels_keep_their_width():
    assert batch_labels({"y": torch.zeros(4, 2)}, 4).shape == (4, 2)
    assert batch_labels({"x": 1}, 4) is None
