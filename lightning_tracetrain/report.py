"""``report.html``: one self-contained page (plotly inlined, works offline) with ridge plots and top examples.

In the spirit of the paper's Figures 1, 5 and 6: per query and layer, the
ridge plot of ``cos_t`` per class (Algorithm 3) for the classes with the
highest predicted probability, the predicted class highlighted, and the most
influential training examples as images (a table for graphs).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

Images = Callable[[int], np.ndarray | None]  # training example id -> image (H, W) or (H, W, 3), None for graphs


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


def examples_figure(examples: list[dict[str, Any]], images: Images, title: str) -> go.Figure | None:
    """The examples as images in a row, titled with id, label and score; None when they are not images."""
    pictures = [images(e["example"]) for e in examples]
    if not examples or any(p is None for p in pictures):
        return None
    titles = [f"#{e['example']} y={e['label']}<br>{e['score']:.3g}" for e in examples]
    return images_figure(pictures, titles, title)  # type: ignore[arg-type]


def images_figure(pictures: list[np.ndarray], titles: list[str], title: str) -> go.Figure:
    """Images (H, W) in grey or (H, W, 3) in colour, in a row with a title each."""
    fig = make_subplots(rows=1, cols=len(pictures), subplot_titles=titles)
    for col, img in enumerate(pictures, start=1):
        if img.ndim == 3:
            lo, hi = float(img.min()), float(img.max())
            fig.add_trace(go.Image(z=(255 * (img - lo) / max(hi - lo, 1e-12)).astype(np.uint8)), row=1, col=col)
        else:
            fig.add_trace(go.Heatmap(z=img[::-1], colorscale="Greys", showscale=False), row=1, col=col)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(title=title, height=200, margin={"l": 10, "r": 10, "t": 70, "b": 10})
    fig.update_annotations(font_size=10)
    return fig


def examples_table(examples: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{e['example']}</td><td>{e['label']}</td><td>{e['score']:.4g}</td></tr>" for e in examples)
    return f"<table><tr><th>example</th><th>label</th><th>score</th></tr>{rows}</table>"


def write_report(path: Path, sections: list[dict[str, Any]], title: str) -> None:
    """Write the page; each section has a heading, an optional query image and a list of figures or HTML."""
    parts: list[str] = []
    first = True
    for section in sections:
        parts.append(f"<h2>{html.escape(section['heading'])}</h2>")
        for item in section["items"]:
            if isinstance(item, go.Figure):
                parts.append(item.to_html(full_html=False, include_plotlyjs=first, config={"displaylogo": False}))
                first = False
            else:
                parts.append(str(item))
    if first:  # no figure at all: still a valid page
        parts.append("<p>No figures.</p>")
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "\n".join(parts) + "</body></html>",
        encoding="utf-8",
    )
