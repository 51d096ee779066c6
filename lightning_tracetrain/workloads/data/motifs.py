"""Motif graphs, generated offline: Barabasi-Albert base graphs with one attached motif whose type is the label.

In the spirit of BA-2Motifs (the benchmark of the GNN explanation literature),
built with PyG's own generators (``BAGraph``, ``HouseMotif``, ``CycleMotif``,
``GridMotif``, ``CustomMotif``). Two variants:

- ``distinct_degrees``: house, 6-cycle, 3x3 grid and 5-clique. The motifs add
  different node degrees, which one GIN layer already sees (with constant node
  features, one layer computes a function of each node's degree).
- ``equal_degrees``: four motifs of 6 nodes and 7 edges with the same degrees
  (two nodes of degree 3, four of degree 2), attached the same way: a triangle
  and a pentagon sharing an edge, two squares sharing an edge, a theta graph of
  paths of 2, 2 and 3 edges, and two triangles joined by an edge. Their degree
  histograms are identical, so one GIN layer sees nothing; the Weisfeiler-Lehman
  test (and so a GIN) tells them apart after three rounds. Depth matters here.

Every graph records which nodes are the motif's (``data.motif``, drawn in the
report) and its motif type (``data.y``). Graphs are cached under ``root`` as
``.npz`` (plain arrays, read without pickle) and regenerated in seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.workloads.data.base import WorkloadDataModule

GENERATOR = 2  # part of the cache key: a change to how graphs are generated never reads an older cache
VARIANTS: dict[str, tuple[str, ...]] = {
    "distinct_degrees": ("house", "cycle", "grid", "clique"),
    "equal_degrees": ("triangle_pentagon", "two_squares", "theta", "bridged_triangles"),
}


def _theta(*inner: int) -> list[tuple[int, int]]:
    """Two nodes (0 and 1) joined by paths with the given numbers of inner nodes."""
    edges, n = [], 2
    for k in inner:
        prev = 0
        for _ in range(k):
            edges.append((prev, n))
            prev, n = n, n + 1
        edges.append((prev, 1))
    return edges


_CUSTOM = {
    "clique": [(i, j) for i in range(5) for j in range(i + 1, 5)],
    "triangle_pentagon": _theta(0, 1, 3),
    "two_squares": _theta(0, 2, 2),
    "theta": _theta(1, 1, 2),
    "bridged_triangles": [(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3), (0, 3)],
}


def motif_edges(name: str) -> torch.Tensor:
    """A motif's edge index (both directions), from PyG's motif generators."""
    from torch_geometric.data import Data
    from torch_geometric.datasets import motif_generator as mg

    if name in _CUSTOM:
        pairs = torch.tensor(_CUSTOM[name]).t()
        edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)
        return mg.CustomMotif(Data(edge_index=edge_index, num_nodes=int(pairs.max()) + 1))().edge_index
    makers = {"house": mg.HouseMotif, "cycle": lambda: mg.CycleMotif(6), "grid": lambda: mg.GridMotif()}
    if name not in makers:
        raise ValueError(f"Unknown motif {name!r}; known: {', '.join([*makers, *_CUSTOM])}.")
    return makers[name]()().edge_index


def attachment_node(edge_index: torch.Tensor) -> int:
    """The motif node joined to the base graph: its first node of the smallest degree (degree 2 in every motif
    of ``equal_degrees``, so all of them are joined the same way)."""
    degree = torch.bincount(edge_index[0])
    return int((degree == degree.min()).nonzero()[0])


def generate_motif_graphs(variant: str, num_graphs: int, base_nodes: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """``num_graphs`` graphs (classes in turn): a BA base graph (``base_nodes``, one edge per new node) with
    one motif attached by one edge to a random base node. Plain arrays: ``edges`` (2, E) with node ids local
    to each graph, ``edge_ptr`` and ``node_ptr`` (where each graph starts), ``label``, ``motif`` (per node)."""
    from torch_geometric.datasets.graph_generator import BAGraph

    if variant not in VARIANTS:
        raise ValueError(f"Unknown motif variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    motifs = [motif_edges(name) for name in VARIANTS[variant]]
    edges, labels, motif_nodes, sizes, counts = [], [], [], [], []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):  # PyG's BA generator draws from torch's and NumPy's global RNGs
            torch.manual_seed(seed)
            np.random.seed(seed)
            base = BAGraph(num_nodes=base_nodes, num_edges=1)
            for i in range(num_graphs):
                label = i % len(motifs)
                motif = motifs[label]
                size = int(motif.max()) + 1
                anchor = int(torch.randint(base_nodes, (1,)))
                join = torch.tensor([[anchor, base_nodes + attachment_node(motif)]]).t()
                graph = torch.cat([_connected(base), motif + base_nodes, join, join.flip(0)], dim=1)
                edges.append(graph)
                labels.append(label)
                motif_nodes.append(torch.arange(base_nodes + size) >= base_nodes)
                sizes.append(base_nodes + size)
                counts.append(graph.shape[1])
    finally:
        np.random.set_state(numpy_state)
    return {
        "edges": torch.cat(edges, dim=1).numpy(),
        "edge_ptr": np.concatenate([[0], np.cumsum(counts)]),
        "node_ptr": np.concatenate([[0], np.cumsum(sizes)]),
        "label": np.asarray(labels, dtype=np.int64),
        "motif": torch.cat(motif_nodes).numpy(),
    }


def _connected(base: Any) -> torch.Tensor:
    """A base graph from PyG's BA generator, drawn again until it is connected (with one edge per new node the
    generator can draw a self-loop, which it drops, and so leave a node outside the tree)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = base.num_nodes
    while True:
        edge_index = base().edge_index
        adjacency = coo_matrix((np.ones(edge_index.shape[1]), edge_index.numpy()), shape=(n, n))
        if connected_components(adjacency, directed=False)[0] == 1:
            return edge_index


class MotifGraphs(Dataset):
    """Graphs of :func:`generate_motif_graphs` as PyG ``Data``: constant node features ``x`` (zeros),
    ``edge_index``, ``y`` (the label: the motif type), ``motif`` (which nodes are the motif's) and
    ``motif_type`` (what the report compares between a query and its proponents)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.targets = self.arrays["label"]  # read by the single-class sampler without building graphs

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Any:
        from torch_geometric.data import Data

        a = self.arrays
        n0, n1 = int(a["node_ptr"][i]), int(a["node_ptr"][i + 1])
        e0, e1 = int(a["edge_ptr"][i]), int(a["edge_ptr"][i + 1])
        return Data(
            x=torch.zeros(n1 - n0, dtype=torch.long),
            edge_index=a["edges"][:, e0:e1].long(),
            y=a["label"][i : i + 1].long(),
            motif=a["motif"][n0:n1].bool(),
            motif_type=a["label"][i : i + 1].long(),
            num_nodes=n1 - n0,
        )


def cached_motif_graphs(root: str | Path, variant: str, num_graphs: int, base_nodes: int, seed: int) -> MotifGraphs:
    """The graphs from ``root`` if generated before with the same arguments, else generated and saved there."""
    key = f"{variant}-{num_graphs}-{base_nodes}-{seed}-g{GENERATOR}"
    path = Path(root) / f"motifs-{key}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            arrays = {k: stored[k] for k in stored.files}
    else:
        arrays = generate_motif_graphs(variant, num_graphs, base_nodes, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, **arrays)
        partial.replace(path)  # a killed run leaves no half-written cache behind
    return MotifGraphs(arrays)


class MotifsDataModule(WorkloadDataModule):
    """Motif graph classification (4 classes), generated offline; single-class training batches with ghost graphs.

    Args:
        variant: ``distinct_degrees`` (one GIN layer can tell the motifs apart) or ``equal_degrees``
            (the motifs share their degrees: depth is needed).
        root: Where the generated graphs are cached.
        train_graphs: Training graphs (classes balanced); validation and test get a quarter each.
        base_nodes: Nodes of each Barabasi-Albert base graph (BA-2Motifs: 20).
        batch_size: Real graphs per training batch.
        ghost_size: Ghost graphs per training batch, for ghost batch norm over their nodes.
        single_class: Single-class batches (else shuffled batches of ``batch_size``).
        seed: Seed of the graphs and of the batch schedule.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        variant: str = "equal_degrees",
        root: str = "runs/motifs/data",
        train_graphs: int = 800,
        base_nodes: int = 20,
        batch_size: int = 32,
        ghost_size: int = 16,
        single_class: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Unknown motif variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
        self.save_hyperparameters()
        self.num_classes = len(VARIANTS[variant])
        self.class_names = VARIANTS[variant]

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_dataset"):
            return
        hp = self.hparams
        held_out = max(hp.train_graphs // 4, self.num_classes)

        def split(n: int, offset: int) -> IndexedDataset:
            graphs = cached_motif_graphs(hp.root, hp.variant, n, hp.base_nodes, hp.seed * 3 + offset)
            return IndexedDataset(graphs)

        self.train_dataset = split(hp.train_graphs, 0)
        self.val_dataset = split(held_out, 1)
        self.test_dataset = split(held_out, 2)
