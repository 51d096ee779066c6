"""The trace as a DataLoader of stored chunks, which is what one explanation pass iterates over.

Each item is what the trace stores for the explained layers over one range of
steps (a stored chunk, or part of one when there are more devices than chunks):
dense deltas, and per-example factor rows for factored layers. Lightning shards
the items over devices with its distributed sampler; in the main process the
loader reads and decodes the next item on a thread while the current one is
computed, and in worker processes DataLoader's own prefetching does the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader, Dataset

from lightning_tracetrain.trace import Trace


def split_ranges(ranges: Sequence[tuple[int, int]], min_items: int) -> list[tuple[int, int]]:
    """Halve the longest range until there are at least ``min_items`` (every device gets work)."""
    out = list(ranges)
    steps = sum(b - a for a, b in out)
    if steps < min_items:
        raise ValueError(
            f"The pass covers {steps} steps, fewer than the {min_items} devices sharing it: use {steps} devices or "
            "fewer."
        )
    while len(out) < min_items:
        i = max(range(len(out)), key=lambda j: out[j][1] - out[j][0])
        a, b = out[i]
        out[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
    return out


class TraceChunks(Dataset):
    """Item ``i``: ``{"start", "stop", "layers": {layer: (deltas, factor rows or None)}}`` for the ``i``-th range.

    Args:
        trace: The trace (it pickles as its path, so worker processes reopen it).
        layers: The layers to read.
        stop: Read steps ``[0, stop)``.
        min_items: At least this many items (the number of devices), splitting stored chunks if needed.
    """

    def __init__(self, trace: Trace, layers: Sequence[str], stop: int, min_items: int = 1) -> None:
        self.trace, self.layers = trace, list(layers)
        self.ranges = split_ranges(trace.chunk_ranges(0, stop), min_items)

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> dict[str, Any]:
        start, stop = self.ranges[i]
        return {
            "start": start,
            "stop": stop,
            "layers": {layer: self.trace.read_chunk(layer, start, stop) for layer in self.layers},
        }


class ChunkLoader(DataLoader):
    """A DataLoader (one item per chunk, ``batch_size=None``) that reads ahead in the main process.

    Without worker processes, the next item (in the sampler's order, so also under Lightning's
    distributed sampler) is read on a thread while the current one is computed; the thread ends
    with the iteration.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.num_workers > 0:
            yield from super().__iter__()
            return
        indices = list(iter(self.sampler))
        pin = self.pin_memory and torch.cuda.is_available()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-read") as pool:
            ahead = pool.submit(self.dataset.__getitem__, indices[0]) if indices else None
            for k in range(len(indices)):
                assert ahead is not None
                item = ahead.result()
                if k + 1 < len(indices):
                    ahead = pool.submit(self.dataset.__getitem__, indices[k + 1])
                yield apply_to_collection(item, torch.Tensor, torch.Tensor.pin_memory) if pin else item
