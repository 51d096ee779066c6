"""The batch protocol shared by recorder, sampler and explainer.

A batch carries ``x`` (model input), ``y`` (labels) and ``index`` (int64
dataset ids); single-class batches add ``ghost`` (bool mask, real rows first).
It is an :class:`IndexedPair` (from ``(x, y)`` datasets: it unpacks as
``x, y = batch`` like the tuple it replaces), a mapping with those keys, or a
PyG ``Batch`` carrying them as attributes. :class:`IndexedDataset` turns any
dataset into one of these shapes.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from lightning_tracetrain.exceptions import MissingIndexError

_WRAPPER_HINT = (
    "Wrap the training dataset with `lightning_tracetrain.IndexedDataset(dataset)` (one line: `x, y = batch` "
    "keeps working, and the batch carries `batch.index`; PyG graphs get `data.index`), or add an int64 'index' "
    "entry with the dataset ids to your mapping batches yourself."
)
_FIELDS = ("x", "y", "index", "ghost")


@dataclass
class IndexedPair:
    """An ``(x, y)`` example or batch that also carries its dataset ids (and ghost flags).

    It unpacks and indexes like the tuple it stands for (``x, y = batch``, ``batch[0]``), so a
    ``training_step`` written for ``(x, y)`` batches works unchanged, while ``batch.index`` (or
    ``batch["index"]``) holds what the recorder needs. DataLoader's default collate stacks a list of
    pairs into one pair; ``.to()`` and ``.pin_memory()`` apply to every tensor, as Lightning and
    DataLoader expect of a batch.

    Example:
        >>> import torch
        >>> pair = IndexedPair(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([4, 7]))
        >>> x, y = pair
        >>> pair.index.tolist(), pair["y"].tolist(), len(pair)
        ([4, 7], [0, 1], 2)
    """

    x: Any
    y: Any
    index: Tensor
    ghost: Tensor | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.x, self.y))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in _FIELDS or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return (self.x, self.y)[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``batch[key]``, or ``default`` when the pair has no such field (as a mapping batch would answer)."""
        value = getattr(self, key, None) if key in _FIELDS else None
        return default if value is None else value

    def to(self, *args: Any, **kwargs: Any) -> IndexedPair:
        """Every tensor of the pair moved or cast (``Tensor.to``'s arguments)."""
        return self._apply(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> IndexedPair:
        return self._apply(lambda t: t.pin_memory())

    def _apply(self, fn: Any) -> IndexedPair:
        return IndexedPair(*(apply_to_collection(getattr(self, f), Tensor, fn) for f in _FIELDS))


def collate_pairs(batch: Sequence[IndexedPair], *, collate_fn_map: dict | None = None) -> IndexedPair:
    """Stack examples into one batch: ``x`` and ``y`` by DataLoader's default collate, ids and ghost flags."""
    ghost = None if batch[0].ghost is None else torch.stack([torch.as_tensor(b.ghost) for b in batch])
    return IndexedPair(
        default_collate([b.x for b in batch]),
        default_collate([b.y for b in batch]),
        torch.stack([torch.as_tensor(b.index) for b in batch]),
        ghost,
    )


def _register_collate() -> None:
    """Teach DataLoader's default collate to stack pairs (torch's documented way to extend it)."""
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # a torch without the registry: pass collate_fn=collate_pairs to the DataLoader
        return
    default_collate_fn_map[IndexedPair] = collate_pairs


_register_collate()


class IndexedDataset(Dataset):
    """Give every example of a dataset its id, following the batch protocol.

    Items of the wrapped dataset may be ``(x, y)`` tuples (they become an
    :class:`IndexedPair`, which still unpacks as ``x, y``), mappings (an
    ``index`` entry is added) or PyG ``Data`` objects (``data.index`` is set on
    a shallow copy). The id is the position in the wrapped dataset. Wrapping is
    the one change a model trained on ``(x, y)`` batches needs to be traced.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> x, y = next(iter(DataLoader(ds, batch_size=3)))  # as without the wrapper
        >>> next(iter(DataLoader(ds, batch_size=3))).index.tolist()
        [0, 1, 2]
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
            return IndexedPair(item[0], torch.as_tensor(item[1]), index, extra.get("ghost"))
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
    """``batch[key]`` of a mapping or pair, ``x``/``y`` of a plain ``(x, y)`` tuple, ``batch.key`` of a PyG
    ``Batch``; None when absent."""
    if isinstance(batch, Mapping | IndexedPair):
        return batch.get(key)
    if _is_plain_pair(batch):
        return batch[0] if key == "x" else batch[1] if key == "y" else None
    return getattr(batch, key, None)


def batch_inputs(batch: Any) -> Any:
    """What the model's ``forward`` takes: ``x`` of a mapping, pair or ``(x, y)`` tuple; a PyG ``Batch`` whole."""
    if isinstance(batch, Mapping | IndexedPair) or _is_plain_pair(batch):
        return batch_field(batch, "x")
    return batch


def _is_plain_pair(batch: Any) -> bool:
    """An unwrapped ``(x, y)`` batch, as a plain DataLoader over a TensorDataset yields."""
    return isinstance(batch, tuple | list) and len(batch) == 2


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
