"""The batch protocol shared by recorder, sampler and explainer.

A batch is a mapping with ``x`` (model input), ``y`` (labels) and ``index``
(int64 dataset ids); single-class batches add ``ghost`` (bool mask, real rows
first). Graph batches are PyG ``Batch`` objects carrying the same names as
attributes. :class:`IndexedDataset` turns any ``(x, y)`` dataset into this shape.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_tracetrain.exceptions import MissingIndexError

_WRAPPER_HINT = (
    "Wrap the training dataset with `lightning_tracetrain.IndexedDataset(dataset)`, which yields "
    "{'x': ..., 'y': ..., 'index': i} (or sets `data.index` on PyG graphs), or add an int64 'index' "
    "entry with the dataset ids yourself."
)


class IndexedDataset(Dataset):
    """Give every example of a dataset its id, following the batch protocol.

    Items of the wrapped dataset may be ``(x, y)`` tuples, mappings (an
    ``index`` entry is added) or PyG ``Data`` objects (``data.index`` is set on
    a shallow copy). The id is the position in the wrapped dataset.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> sorted(ds[2])
        ['index', 'x', 'y']
        >>> int(ds[2]["index"])
        2
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, bool]) -> Any:
        """Item ``i``; a key ``(i, is_ghost)`` (from a single-class batch sampler) also sets ``ghost``."""
        i, ghost = key if isinstance(key, tuple) else (key, None)
        item = self.dataset[i]
        index = torch.tensor(i, dtype=torch.long)
        extra = {} if ghost is None else {"ghost": torch.tensor(ghost)}
        if isinstance(item, Mapping):
            return {**item, "index": index, **extra}
        if isinstance(item, tuple | list) and len(item) == 2:
            return {"x": item[0], "y": torch.as_tensor(item[1]), "index": index, **extra}
        if is_graph_item(item):
            return _indexed_graph(item, index, extra.get("ghost"))
        raise TypeError(
            f"IndexedDataset cannot tell the input from the label in items of type {type(item).__name__}: "
            "return (x, y) tuples, mappings with 'x' and 'y', or PyG Data objects."
        )


def is_graph_item(item: Any) -> bool:
    """A PyG ``Data`` object (PyG is loaded whenever one exists, so this never imports it)."""
    data = sys.modules.get("torch_geometric.data")
    return data is not None and isinstance(item, data.Data)


def loader_class(dataset: Any) -> type:
    """PyG's DataLoader for a dataset of graphs (it collates them into a ``Batch``), else torch's."""
    items = dataset.dataset if isinstance(dataset, IndexedDataset) else dataset
    if len(items) and is_graph_item(items[0]):
        from torch_geometric.loader import DataLoader as GraphLoader

        return GraphLoader
    from torch.utils.data import DataLoader

    return DataLoader


class _PlainIndex:
    """Mixin for PyG ``Data`` classes: ``index`` holds dataset ids, concatenated without offsets."""

    _plain_index = True

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        return 0 if key == "index" else super().__inc__(key, value, *args, **kwargs)  # type: ignore[misc]

    def __cat_dim__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        return 0 if key == "index" else super().__cat_dim__(key, value, *args, **kwargs)  # type: ignore[misc]


@functools.cache
def indexed_graph_class(base: type) -> type:
    """The subclass of a PyG ``Data`` class whose ``index`` PyG collates as plain ids.

    PyG offsets every attribute whose name contains "index" by the number of nodes when batching
    (it takes them for edge indices); the subclass turns that off for ``index`` alone. Its metaclass
    pickles it as "the indexed class of ``base``", so DataLoader workers and PyG's own ``Batch``
    classes built on it pickle without registering anything in a module.
    """
    meta = _indexed_meta(type(base))
    return meta(f"Indexed{base.__name__}", (_PlainIndex, base), {"__module__": __name__})


@functools.cache
def _indexed_meta(base_meta: type) -> type:
    meta = type(f"_Indexed{base_meta.__name__}", (base_meta,), {})
    copyreg.pickle(meta, lambda cls: (indexed_graph_class, (cls.__bases__[1],)))
    return meta


def _indexed_graph(data: Any, index: Tensor, ghost: Tensor | None = None) -> Any:
    """A shallow copy of a PyG graph with ``index`` (and ``ghost``) set, collated as plain ids."""
    cls = type(data)
    out = copy.copy(data)
    if not getattr(cls, "_plain_index", False):
        object.__setattr__(out, "__class__", indexed_graph_class(cls))  # Data.__setattr__ would store it
    out.index = index.view(1)
    if ghost is not None:
        out.ghost = ghost.view(1)
    return out


def batch_field(batch: Any, key: str) -> Any:
    """``batch[key]`` of a mapping, ``batch.key`` of a PyG ``Batch``; None when absent."""
    if isinstance(batch, Mapping):
        return batch.get(key)
    return getattr(batch, key, None)


def batch_inputs(batch: Any) -> Any:
    """What the model's ``forward`` takes: ``batch["x"]`` of a mapping, the whole PyG ``Batch`` otherwise."""
    return batch["x"] if isinstance(batch, Mapping) else batch


def batch_index(batch: Any) -> Tensor:
    """The dataset ids of a batch's examples as a 1-d int64 tensor."""
    index = batch_field(batch, "index")
    if not isinstance(index, Tensor):
        kind = "mapping without 'index'" if isinstance(batch, Mapping) else f"{type(batch).__name__} without `index`"
        raise MissingIndexError(
            f"TraceCallback needs the dataset ids of every training batch, got a {kind}. {_WRAPPER_HINT}"
        )
    if index.is_floating_point() or index.is_complex():
        raise MissingIndexError(
            f"Batch 'index' must hold integer dataset ids, got dtype {index.dtype}. {_WRAPPER_HINT}"
        )
    return index.reshape(-1).long()


def batch_labels(batch: Any, num_examples: int) -> Tensor | None:
    """The labels of a batch as ``(num_examples, ...)``, or None when the batch has no ``y``."""
    y = batch_field(batch, "y")
    if not isinstance(y, Tensor):
        return None
    if y.numel() == num_examples:
        return y.reshape(num_examples)
    return y.reshape(num_examples, -1)


def batch_ghost(batch: Any, num_examples: int) -> Tensor:
    """The ghost mask of a batch (all False when the batch has no ``ghost`` entry)."""
    ghost = batch_field(batch, "ghost")
    if ghost is None:
        return torch.zeros(num_examples, dtype=torch.bool)
    return torch.as_tensor(ghost, dtype=torch.bool).reshape(num_examples)
