"""Graphs in the report: small node-link drawings of the query and its proponents and opponents (plotly, offline).

A graph enters the influence document as a drawing (:func:`graph_drawing`):
its undirected edges, node positions from a seeded spring layout, and, where the
dataset knows them, which nodes form its motif (``data.motif``, coloured) and the
motif's type (``data.motif_type``), so the report can say whether a query's top
proponents carry the query's motif.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

GRAPH_THUMBNAIL = 170  # pixels per graph in a row of graphs
MOTIF, OTHER = "#ff7f0e", "#7f7f7f"


def graph_drawing(data: Any, seed: int = 0) -> dict[str, Any]:
    """A PyG graph as JSON: ``nodes``, undirected ``edges`` (two lists), ``layout`` (x, y per node) and, when
    the graph has them, ``motif`` (0/1 per node) and ``motif_type``."""
    import networkx as nx

    n = int(data.num_nodes)
    ei = data.edge_index.cpu()
    pairs = torch.unique(torch.stack([ei.min(0).values, ei.max(0).values], 1), dim=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(pairs.tolist())
    position = nx.spring_layout(graph, seed=seed)
    drawing: dict[str, Any] = {
        "nodes": n,
        "edges": pairs.t().tolist() if len(pairs) else [[], []],
        "layout": [[round(float(position[i][0]), 3), round(float(position[i][1]), 3)] for i in range(n)],
    }
    motif = getattr(data, "motif", None)
    if isinstance(motif, torch.Tensor) and motif.numel() == n:
        drawing["motif"] = motif.reshape(-1).int().tolist()
    motif_type = getattr(data, "motif_type", None)
    if motif_type is not None:
        drawing["motif_type"] = int(torch.as_tensor(motif_type).reshape(-1)[0])
    return drawing


def is_drawing(value: Any) -> bool:
    """A graph drawing (a mapping), as opposed to an image array."""
    return isinstance(value, dict) and "edges" in value


def graphs_figure(drawings: list[dict[str, Any]], titles: list[str], title: str) -> go.Figure:
    """Graph drawings in a row with a title each; motif nodes in orange, the other nodes grey."""
    fig = make_subplots(rows=1, cols=len(drawings), subplot_titles=titles)
    for col, d in enumerate(drawings, start=1):
        xy = np.asarray(d["layout"], dtype=float).reshape(-1, 2)
        src, dst = d["edges"]
        ex = [v for u, w in zip(src, dst, strict=True) for v in (xy[u, 0], xy[w, 0], None)]
        ey = [v for u, w in zip(src, dst, strict=True) for v in (xy[u, 1], xy[w, 1], None)]
        fig.add_trace(
            go.Scatter(x=ex, y=ey, mode="lines", line={"color": "#bbbbbb", "width": 1}, hoverinfo="skip"),
            row=1,
            col=col,
        )
        motif = d.get("motif", [0] * d["nodes"])
        fig.add_trace(
            go.Scatter(
                x=xy[:, 0],
                y=xy[:, 1],
                mode="markers",
                marker={"size": 6, "color": [MOTIF if m else OTHER for m in motif]},
                text=[f"node {i}{' (motif)' if m else ''}" for i, m in enumerate(motif)],
                hovertemplate="%{text}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    return thumbnail_row(fig, title, GRAPH_THUMBNAIL * len(drawings), height=240)


def thumbnail_row(fig: go.Figure, title: str, width: int, height: int) -> go.Figure:
    """A row of thumbnails (images or graphs) without axes, one size each however many there are."""
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(
        title=title,
        showlegend=False,
        height=height,
        width=40 + width,
        margin={"l": 10, "r": 10, "t": 70, "b": 10},
        meta="images",  # the page shows no toolbar on thumbnails
    )
    fig.update_annotations(font_size=10)
    return fig


def motif_agreement(query: dict[str, Any] | None, examples: list[dict[str, Any]], graphs: dict[str, Any]) -> str:
    """One sentence: how many of the top proponents carry the query's motif type ("" when types are unknown)."""
    if query is None or "motif_type" not in query or not examples:
        return ""
    types = [graphs.get(str(e["example"]), {}).get("motif_type") for e in examples]
    if any(t is None for t in types):
        return ""
    same = sum(t == query["motif_type"] for t in types)
    top1 = "yes" if types[0] == query["motif_type"] else "no"
    return (
        f"<p>Top proponents with the query's motif type ({query['motif_type']}): {same} of {len(types)}; "
        f"the top-1 proponent: {html.escape(top1)}.</p>"
    )
