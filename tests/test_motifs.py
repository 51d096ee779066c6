"""The motif graph workload: deterministic graphs whose label is the attached motif, single-class batches with
ghost graphs, its configs through LightningCLI and explain (exact on every GIN layer), graphs in the report, and
the depth diagnosis command."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

import networkx as nx
import numpy as np
import pytest
import torch
from conftest import headless_chromium, needs_chromium

from lightning_tracetrain import Trace
from lightning_tracetrain.explain.cli import main as explain_main
from lightning_tracetrain.lightning_cli import cli_main
from lightning_tracetrain.singleclass import ghost_masks
from lightning_tracetrain.workloads.data.motifs import (
    VARIANTS,
    MotifsDataModule,
    attachment_node,
    generate_motif_graphs,
    motif_edges,
)

CONFIGS = Path(__file__).parents[1] / "configs"


def _nx(edge_index: torch.Tensor, nodes: list[int] | None = None) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(range(int(edge_index.max()) + 1) if nodes is None else nodes)
    graph.add_edges_from(edge_index.t().tolist())
    return graph


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_graphs_are_deterministic_for_a_seed_whatever_the_global_generators(variant):
    np.random.seed(1)
    torch.manual_seed(1)
    first = generate_motif_graphs(variant, 12, seed=3)
    np.random.seed(2)
    torch.manual_seed(2)
    again = generate_motif_graphs(variant, 12, seed=3)
    other = generate_motif_graphs(variant, 12, seed=4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["edges"], other["edges"])
    state = np.random.get_state()
    generate_motif_graphs(variant, 2, seed=5)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's NumPy generator is left as it was


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_labels_match_the_attached_motif(tmp_path, variant):
    dm = MotifsDataModule(variant=variant, root=str(tmp_path), train_graphs=16)
    dm.setup()
    for i in range(len(dm.train_dataset)):
        g = dm.train_dataset[i]
        label = int(g.y)
        assert int(g.motif_type) == label and g.num_nodes == 20 + int(g.motif.sum())
        whole = _nx(g.edge_index, list(range(g.num_nodes)))
        motif_nodes = g.motif.nonzero().reshape(-1).tolist()
        assert nx.is_isomorphic(whole.subgraph(motif_nodes), _nx(motif_edges(VARIANTS[variant][label])))
        joins = [(u, v) for u, v in whole.edges if g.motif[u] != g.motif[v]]
        assert len(joins) == 1  # one edge joins the motif to its base graph
        assert nx.is_connected(whole.subgraph(range(20)))  # the BA base graph is one tree


def test_equal_degree_motifs_need_three_weisfeiler_lehman_rounds():
    """What makes depth matter: one round (one GIN layer) sees the same degrees, three tell the motifs apart."""
    hashes = {}
    for rounds in (1, 3):
        seen = set()
        for name in VARIANTS["equal_degrees"]:
            edges = motif_edges(name)
            graph = _nx(edges)
            graph.add_edge(attachment_node(edges), "base")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # networkx's note on hashes of graphs without attributes
                seen.add(nx.weisfeiler_lehman_graph_hash(graph, iterations=rounds))
        hashes[rounds] = len(seen)
    assert hashes == {1: 1, 3: len(VARIANTS["equal_degrees"])}


def test_single_class_batches_with_ghost_graphs(tmp_path):
    dm = MotifsDataModule(root=str(tmp_path), train_graphs=64, batch_size=8, ghost_size=4)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sum(int((~b.ghost).sum()) for b in batches) == 64  # every training graph once per epoch
    for batch in batches:
        real = ~batch.ghost
        assert int(real.sum()) <= 8 and int(batch.ghost.sum()) == 4
        assert batch.y[real].unique().numel() == 1  # one class per step
        graphs, nodes = ghost_masks(batch)
        assert torch.equal(graphs, batch.ghost)
        assert torch.equal(nodes, batch.ghost[batch.batch])  # ghost batch norm over the ghost graphs' nodes
    # the cache holds the same graphs: a second datamodule reads them back identical
    again = MotifsDataModule(root=str(tmp_path), train_graphs=64, batch_size=8, ghost_size=4)
    again.setup()
    assert torch.equal(again.train_dataset[5].edge_index, dm.train_dataset[5].edge_index)
    assert len(list(Path(tmp_path).glob("*.npz"))) == 3 and not list(Path(tmp_path).glob("*.partial*"))


@pytest.fixture(scope="module")
def motif_run(tmp_path_factory):
    """Both motif configs trained briefly through LightningCLI, and the deep one explained."""
    root = tmp_path_factory.mktemp("motifs")
    out = {}
    with contextlib.chdir(root), mock.patch.object(sys, "argv", ["pytest"]):  # the configs write under runs/
        for name in ("motifs_gin", "motifs_shallow"):
            cli_main(
                ["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--trainer.max_epochs", "1",
                 "--data.train_graphs", "48"]
            )  # fmt: skip
            folder = root / "runs" / name
            doc = explain_main(
                ["--ckpt", str(folder / "checkpoints" / "last.ckpt"), "--trace", str(folder / "trace"),
                 "--queries", "0", "1", "--out", str(folder / "explanations")]
            )  # fmt: skip
            out[name] = (Trace(folder / "trace"), doc, folder / "explanations")
    return out


@pytest.mark.slow
def test_configs_explain_every_gin_layer_exactly(motif_run):
    deep, shallow = motif_run["motifs_gin"][0], motif_run["motifs_shallow"][0]
    convs = [f"convs.{i}.mlp.{j}" for i in range(4) for j in (0, 3)]
    assert deep.layers == [*convs, "head"]
    assert shallow.layers == ["convs.0.mlp.0", "convs.0.mlp.3", "head"]
    for trace, doc, _ in motif_run.values():
        assert (trace.steps.label >= 0).all() and trace.examples.ghost.any()  # single-class steps with ghosts
        for query in doc["queries"]:
            assert set(query["layers"]) == set(trace.layers)
            for layer in query["layers"].values():
                assert abs(layer["completeness_residual"]) <= 1e-5


@pytest.mark.slow
def test_the_document_holds_graph_drawings_with_the_motif(motif_run):
    _, doc, folder = motif_run["motifs_gin"]
    graphs = doc["graphs"]
    query = graphs["test"]["0"]
    assert len(query["layout"]) == query["nodes"] == len(query["motif"]) and sum(query["motif"]) >= 5
    assert query["motif_type"] == doc["queries"][0]["label"]
    shown = {e["example"] for q in doc["queries"] for layer in q["layers"].values() for e in layer["top_examples"]}
    assert {str(e) for e in shown} <= set(graphs["train"])
    report = (folder / "report.html").read_text()
    assert "Top proponents with the query's motif type" in report and "images" not in doc


@pytest.mark.slow
@needs_chromium
def test_graph_report_loads_in_headless_chromium_without_console_errors(motif_run):
    console, dom = headless_chromium(motif_run["motifs_gin"][2] / "report.html")
    assert not console, console
    assert dom.count("the query") >= 2  # each query drawn as a graph
    assert dom.count('class="plot-container') >= 2 * (3 + 9 * 2)  # query, heatmap, proponents, ridges


@pytest.mark.slow
def test_depth_command_writes_its_table(tmp_path, capsys):
    from lightning_tracetrain.__main__ import main

    out = tmp_path / "depth"
    result = main(
        ["depth", "--epochs", "1", "--variants", "equal_degrees", "--train-graphs", "32",
         "--data-root", str(tmp_path / "data"), "--out", str(out)]
    )  # fmt: skip
    assert set(result["runs"]) == {"equal_degrees/deep", "equal_degrees/shallow"}
    for run in result["runs"].values():
        for layer in run["layers"].values():
            assert 0.0 <= layer["specificity"] <= 1.0 and 0.0 <= layer["top1_motif"] <= 1.0
    assert json.loads((out / "depth.json").read_text())["verdict"] == result["verdict"]
    assert "| equal_degrees | deep |" in (out / "depth.md").read_text()
    assert "The diagnosis" in capsys.readouterr().out
