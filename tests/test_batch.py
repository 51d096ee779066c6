"""The batch protocol: ids through the default and the PyG collation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader as GraphLoader

from lightning_tracetrain import IndexedDataset, MissingIndexError
from lightning_tracetrain.batch import IndexedPair, batch_field, batch_ghost, batch_index, batch_inputs, batch_labels


@pytest.mark.parametrize("num_workers", [0, 1])
def test_tuple_dataset_batches_unpack_as_before_and_carry_their_ids(num_workers):
    xs, ys = torch.randn(10, 3), torch.arange(10) % 4
    ds = IndexedDataset(TensorDataset(xs, ys))
    batch = next(iter(DataLoader(ds, batch_size=4, sampler=[7, 2, 9, 0], num_workers=num_workers)))
    x, y = batch  # a training_step written for (x, y) batches works unchanged
    torch.testing.assert_close(x, xs[[7, 2, 9, 0]])
    assert y.tolist() == batch[1].tolist() == batch["y"].tolist() == [3, 2, 1, 0]
    assert batch_index(batch).tolist() == batch.index.tolist() == [7, 2, 9, 0]
    assert batch_labels(batch, 4).tolist() == [3, 2, 1, 0]
    assert batch_ghost(batch, 4).tolist() == [False] * 4
    assert batch_inputs(batch) is batch.x and batch_field(batch, "ghost") is None


def test_pairs_move_like_batches_and_keep_their_ids():
    from lightning.pytorch.utilities import move_data_to_device

    pair = IndexedPair({"a": torch.zeros(2, 3)}, torch.tensor([1, 0]), torch.tensor([5, 6]), torch.tensor([0, 1]))
    moved = move_data_to_device(pair, torch.device("cpu"))
    assert isinstance(moved, IndexedPair) and moved.index.tolist() == [5, 6] and moved.ghost.tolist() == [0, 1]
    cast = pair.to(torch.float64)
    assert cast.x["a"].dtype == torch.float64 and cast.y.dtype == torch.float64
    with pytest.raises(KeyError):
        IndexedPair(torch.zeros(1), torch.zeros(1), torch.zeros(1))["ghost"]


def test_single_class_keys_set_the_ghost_flags_of_pairs():
    ds = IndexedDataset(TensorDataset(torch.randn(6, 2), torch.tensor([0, 0, 0, 1, 1, 1])))
    batch = DataLoader(ds, batch_sampler=[[(0, False), (1, False), (4, True)]]).__iter__().__next__()
    assert batch.index.tolist() == [0, 1, 4] and batch_ghost(batch, 3).tolist() == [False, False, True]


def test_plain_tuple_batches_give_their_inputs_and_labels():
    batch = (torch.zeros(2, 3), torch.tensor([1, 0]))
    assert batch_inputs(batch) is batch[0] and batch_field(batch, "y") is batch[1]
    with pytest.raises(MissingIndexError, match=r"tuple without `index`.*IndexedDataset"):
        batch_index(batch)


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
