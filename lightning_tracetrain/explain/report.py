"""``report.html``, rendered from an influence document alone: one self-contained page (plotly inlined, offline).

In the spirit of the paper's Figures 1, 5 and 6: per query and layer, the
ridge plot of ``cos_t`` per class (Algorithm 3) for the classes with the
highest predicted probability, the predicted class highlighted, and the most
influential training examples as images, or as node-link drawings for graphs
(with the motif nodes coloured where the dataset knows them; a table otherwise).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lightning_tracetrain.explain.graphs import graphs_figure, motif_agreement, thumbnail_row


def write_report(path: str | Path, doc: dict[str, Any]) -> None:
    """Render ``doc`` (see :func:`~lightning_tracetrain.explain.document.influence_document`) to ``path``."""
    Path(path).write_text(render_report(doc), encoding="utf-8")


HOW_TO_READ = (
    "How to read this: the heatmap shows, for every traced layer, which classes' training steps built this "
    "input's representation (each row splits the positive contributions, 100% in all). Below it, per layer, the "
    "ridge plot shows for each class how its steps' contributions point relative to the representation (the cosine: "
    "right of 0 they built it, left of 0 they worked against it; taller means more of them), followed by the "
    "training examples that contributed most and least."
)


def render_report(doc: dict[str, Any]) -> str:
    """The page for an influence document, as HTML: a table of contents, a summary table of every query, then
    per drawn query a summary (class shares per layer, the last layer's proponents) and the figures per layer."""
    title = f"Why did the model learn this? ({doc['model']})"
    page = _Page()
    drawn = [q for q in doc["queries"] if any("ridge" in layer for layer in q["layers"].values())]
    page.add(_contents(drawn))
    page.add(summary_table(doc))
    if len(drawn) < len(doc["queries"]):
        page.add(
            f"<p>Figures for the first {len(drawn)} of {len(doc['queries'])} queries (influence.json holds every "
            "query's scores; explain with --report-queries N to draw more).</p>"
        )
    for number, q in enumerate(drawn):
        _query_section(page, doc, q, number)
    if page.first:  # no figure at all: still a valid page
        page.add("<p>No figures.</p>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}nav li{margin:2px 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "\n".join(page.parts) + "</body></html>"
    )


class _Page:
    """The page's parts; plotly's script is inlined once, with the first figure."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.first = True

    def add(self, item: go.Figure | str) -> None:
        if isinstance(item, go.Figure):
            config = {"displaylogo": False, "displayModeBar": item.layout.meta != "images"}  # no toolbar on images
            self.parts.append(item.to_html(full_html=False, include_plotlyjs=self.first, config=config))
            self.first = False
        else:
            self.parts.append(item)


def _anchor(number: int, layer: str | None = None) -> str:
    return f"q{number}" if layer is None else f"q{number}-{re.sub(r'[^A-Za-z0-9_-]', '-', layer)}"


def _contents(drawn: list[dict[str, Any]]) -> str:
    items = []
    for number, q in enumerate(drawn):
        layers = "".join(f"<li><a href='#{_anchor(number, name)}'>{html.escape(name)}</a></li>" for name in q["layers"])
        heading = f"Query {q['query']}: label {q['label']}, predicted {q['predicted']}"
        items.append(f"<li><a href='#{_anchor(number)}'>{heading}</a><ul>{layers}</ul></li>")
    return f"<nav id='contents'><h2>Contents</h2><ul>{''.join(items)}</ul></nav>" if items else ""


def _query_section(page: _Page, doc: dict[str, Any], q: dict[str, Any], number: int) -> None:
    images, graphs = doc.get("images", {}), doc.get("graphs", {})
    grid = np.linspace(doc["ridge_grid"]["start"], doc["ridge_grid"]["stop"], doc["ridge_grid"]["points"])
    p = q["probabilities"][q["predicted"]]
    heading = f"Query {q['query']}: label {q['label']}, predicted {q['predicted']} (p={p:.2f})"
    page.add(f"<h2 id='{_anchor(number)}'>{heading}</h2>")
    query_image = images.get("test", {}).get(str(q["query"]))
    query_graph = graphs.get("test", {}).get(str(q["query"]))
    if query_image is not None:
        page.add(_query_figure(doc, q, np.asarray(query_image), p))
    elif query_graph is not None:
        page.add(graphs_figure([query_graph], [f"#{q['query']} y={q['label']}<br>p={p:.2f}"], "the query"))
    page.add(class_share_heatmap(q))
    last = list(q["layers"])[-1]
    if not doc["privacy"]:
        _examples(
            page,
            doc,
            last,
            "most influential training examples of the last layer",
            q["layers"][last]["top_examples"],
        )
    page.add(f"<p>{HOW_TO_READ}{_mixed_note(doc)}</p>")
    for name, layer in q["layers"].items():
        page.add(f"<h3 id='{_anchor(number, name)}'>{html.escape(name)}</h3>")
        ridge = layer["ridge"]
        densities = {int(c): np.asarray(d) for c, d in ridge["density"].items()}
        title = f"{name}: cos of each step's contribution, by class"
        page.add(ridge_figure(grid, densities, ridge["classes"], q["predicted"], title))
        if not doc["privacy"]:
            _examples(page, doc, name, "most influential training examples", layer["top_examples"])
            page.add(motif_agreement(query_graph, layer["top_examples"], graphs.get("train", {})))
            _examples(page, doc, name, "strongest opponents", layer["opponents"])


def _mixed_note(doc: dict[str, Any]) -> str:
    """One sentence when steps mix classes: what a ridge then shows (influence.json's ``mixed_steps``)."""
    mixed = doc.get("mixed_steps", 0.0)
    if not mixed:
        return ""
    return (
        f" In this run {mixed:.0%} of the steps mixed several classes (shuffled batches), so each step counts towards "
        "a class's curve in proportion to that class's share of its examples: the curves overlap more than with "
        "single-class batches, and a class stands out only where its steps point differently."
    )


def _examples(page: _Page, doc: dict[str, Any], name: str, kind: str, examples: list[dict[str, Any]]) -> None:
    """Training examples as thumbnails of one size when they are images or graphs, else as a table."""
    if not examples:
        page.add(f"<p>{html.escape(name)}: no {kind} (no training example has a negative score).</p>")
        return
    titles = [f"#{e['example']} y={e['label']}<br>{e['score']:.3g}" for e in examples]
    pictures = [doc.get("images", {}).get("train", {}).get(str(e["example"])) for e in examples]
    drawings = [doc.get("graphs", {}).get("train", {}).get(str(e["example"])) for e in examples]
    if all(pic is not None for pic in pictures):
        page.add(images_figure([np.asarray(pic) for pic in pictures], titles, f"{name}: {kind}"))
    elif all(d is not None for d in drawings):
        page.add(graphs_figure(drawings, titles, f"{name}: {kind}"))  # type: ignore[arg-type]
    else:
        page.add(f"<h4>{html.escape(name)}: {kind}</h4>" + examples_table(examples))


def class_share_heatmap(q: dict[str, Any]) -> go.Figure:
    """Layers x classes: each class's share of the positive class scores (gamma) of the layer, for one query."""
    layers = list(q["layers"])
    classes = sorted({int(c) for layer in q["layers"].values() for c in layer["class_scores"]})
    shares = []
    for name in layers:
        scores = q["layers"][name]["class_scores"]
        positive = sum(v for v in scores.values() if v > 0) or 1.0
        shares.append([max(scores.get(str(c), 0.0), 0.0) / positive for c in classes])
    fig = go.Figure(
        go.Heatmap(
            z=shares,
            x=[f"class {c}" for c in classes],
            y=layers,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=[[f"{v:.0%}" for v in row] for row in shares],
            texttemplate="%{text}",
            hovertemplate="%{y}, %{x}: %{text}<extra></extra>",
            colorbar={"title": "share"},
        )
    )
    fig.update_layout(
        title="Which classes built this representation, layer by layer (share of positive gamma)",
        height=120 + 30 * len(layers),
        margin={"l": 110, "r": 10, "t": 50, "b": 40},
        yaxis={"autorange": "reversed"},
    )
    return fig


def summary_table(doc: dict[str, Any]) -> str:
    """One row per query: label, prediction and, per layer, the predicted class's share of the positive class
    scores and (unless private) the top training example."""
    layers = list(doc["queries"][0]["layers"]) if doc["queries"] else []
    head = "".join(f"<th>{html.escape(name)}</th>" for name in layers)
    rows = []
    for q in doc["queries"]:
        cells = []
        for name in layers:
            layer = q["layers"][name]
            positive = sum(v for v in layer["class_scores"].values() if v > 0) or 1.0
            share = max(layer["class_scores"].get(str(q["predicted"]), 0.0), 0.0) / positive
            top = layer.get("top_examples") or []
            best = f"; #{top[0]['example']} (class {top[0]['label']})" if top else ""
            cells.append(f"<td>{share:.0%}{best}</td>")
        p = q["probabilities"][q["predicted"]]
        rows.append(
            f"<tr><td>{q['query']}</td><td>{q['label']}</td><td>{q['predicted']} ({p:.2f})</td>{''.join(cells)}</tr>"
        )
    return (
        "<p>Per layer: the share of positive gamma from training steps (examples) of the predicted class, and the "
        "most influential training example.</p><table><tr><th>query</th><th>label</th><th>predicted (p)</th>"
        f"{head}</tr>{''.join(rows)}</table>"
    )


def _query_figure(doc: dict[str, Any], q: dict[str, Any], image: np.ndarray, p: float) -> go.Figure:
    """The query, and beside it what ClaDec and the reference autoencoder reconstruct of it (if asked)."""
    cladec = doc.get("cladec")
    reconstructions = {} if cladec is None else cladec["reconstructions"].get(str(q["query"]), {})
    if not reconstructions:
        return images_figure([image], [f"#{q['query']} y={q['label']}<br>p={p:.2f}"], "the query")
    layer = cladec["layer"]
    return images_figure(
        [image, *(np.asarray(r) for r in reconstructions.values())],
        ["the query", *(f"{name}<br>from {layer}" for name in reconstructions)],
        f"the query (p={p:.2f}) and what {layer} keeps of it (ClaDec vs reference autoencoder)",
    )


def ridge_figure(
    grid: np.ndarray, densities: dict[int, np.ndarray], classes: list[int], predicted: int, title: str
) -> go.Figure:
    """Filled density rows, one per class (highest probability on top), the predicted class highlighted."""
    fig = go.Figure()
    peak = max((float(densities[c].max()) for c in classes if c in densities), default=1.0) or 1.0
    for row, cls in enumerate(reversed(classes)):
        density = densities.get(cls, np.zeros_like(grid))
        color = "#d62728" if cls == predicted else "#1f77b4"
        fig.add_trace(
            go.Scatter(
                x=grid, y=np.full_like(grid, row), mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"
            )
        )
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=row + 0.9 * density / peak,
                mode="lines",
                fill="tonexty",
                line={"color": color, "width": 1.5},
                name=f"class {cls}",
                showlegend=False,
                hovertemplate=f"class {cls}<br>cos %{{x:.2f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        height=60 + 34 * len(classes),
        margin={"l": 70, "r": 10, "t": 40, "b": 30},
        xaxis={"title": "cosine of step contribution and representation", "range": [-1, 1]},
        yaxis={"tickvals": list(range(len(classes))), "ticktext": [f"class {c}" for c in reversed(classes)]},
    )
    return fig


THUMBNAIL = 130  # pixels per image in a row of images


def images_figure(pictures: list[np.ndarray], titles: list[str], title: str) -> go.Figure:
    """Images (H, W) in grey or (H, W, 3) in colour, in a row with a title each."""
    fig = make_subplots(rows=1, cols=len(pictures), subplot_titles=titles)
    for col, img in enumerate(pictures, start=1):
        if img.ndim == 3:
            lo, hi = float(img.min()), float(img.max())
            fig.add_trace(go.Image(z=(255 * (img - lo) / max(hi - lo, 1e-12)).astype(np.uint8)), row=1, col=col)
        else:
            fig.add_trace(go.Heatmap(z=img[::-1], colorscale="Greys", showscale=False), row=1, col=col)
    return thumbnail_row(fig, title, THUMBNAIL * len(pictures), height=210)


def examples_table(examples: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{e['example']}</td><td>{e['label']}</td><td>{e['score']:.4g}</td></tr>" for e in examples)
    return f"<table><tr><th>example</th><th>label</th><th>score</th></tr>{rows}</table>"
