"""``influence.json``: everything an explanation shows, as one JSON document (schema in docs/influence-format.md).

The report is rendered from this document alone, so the page and the data
can never disagree, and the document can be re-rendered or read by other tools.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tracetrain.explain.attribution import (
    LayerAttribution,
    class_attribution,
    example_attribution,
    ridge_densities,
    step_class_shares,
)
from lightning_tracetrain.explain.graphs import is_drawing
from lightning_tracetrain.trace import Trace

# training example id -> image (H, W) or (H, W, 3), a graph drawing (explain/graphs.py), or None (a table)
Images = Callable[[int], np.ndarray | dict[str, Any] | None]
GRID = {"start": -1.0, "stop": 1.0, "points": 201}  # where the ridge densities are evaluated
RIDGE_CLASSES = 10  # ridge rows per layer: the most probable classes


@dataclass(frozen=True)
class Query:
    """A test input being explained: its index in the test set, its label, and its picture (an image array or a
    graph drawing) when it has one."""

    index: int
    label: int
    image: np.ndarray | dict[str, Any] | None = None


def influence_document(
    trace: Trace,
    stop: int,
    results: Mapping[str, LayerAttribution],
    logits: Tensor,
    queries: list[Query],
    *,
    checkpoint: str,
    score: str = "gamma",
    top_k: int = 5,
    privacy: bool = False,
    bandwidth: float = 0.1,
    train_images: Images | None = None,
    cladec: dict[str, Any] | None = None,
    figures: int | None = None,
) -> dict[str, Any]:
    """The document for ``queries`` (in the order of ``logits`` and of the results' query axis).

    Only the first ``figures`` queries (default: all) carry what the report draws, ridge densities and
    images, so a document of thousands of queries stays small. ``cladec`` (``{"layer", "alpha", "epochs",
    "reconstructions": {query index: {decoder: image}}}``) is added as it is; images and graph drawings
    (``graphs``) are left out in privacy mode. Documents of consecutive query batches are joined with
    :func:`merge_documents`.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be 0 or more, got {top_k}.")
    if not bandwidth > 0:
        raise ValueError(f"The ridge plots' bandwidth must be positive, got {bandwidth}.")
    figures = len(queries) if figures is None else max(0, figures)
    probs = logits.float().softmax(-1).cpu()
    grid = torch.linspace(GRID["start"], GRID["stop"], GRID["points"])
    doc: dict[str, Any] = {
        "score": score,
        "privacy": privacy,
        "trace": str(trace.path),
        "model": trace.module.class_path,
        "checkpoint": str(checkpoint),
        "steps": stop,
        "bandwidth": bandwidth,
        "ridge_grid": GRID,
        # steps whose real examples are of several classes (shuffled batches): they count towards each
        # class's ridge in proportion to its share of the step
        "mixed_steps": round(_mixed_steps(trace, stop), 4),
        "queries": [],
    }
    shares = step_class_shares(trace.steps, trace.examples, stop, probs.shape[1]) if figures else None
    shown: set[int] = set()
    for qi, query in enumerate(queries):
        predicted = int(probs[qi].argmax())
        entry: dict[str, Any] = {
            "query": query.index,
            "label": query.label,
            "predicted": predicted,
            "probabilities": [round(float(p), 6) for p in probs[qi]],
            "layers": {},
        }
        classes = probs[qi].argsort(descending=True)[:RIDGE_CLASSES].tolist()
        for name, attribution in results.items():
            layer = _layer(trace, stop, attribution, qi, score, top_k, privacy)
            if qi < figures:
                exact = attribution.rows  # a factored layer: each row's own share of gamma
                if exact is not None:
                    shares_q = step_class_shares(trace.steps, trace.examples, stop, probs.shape[1], exact[qi])
                densities = ridge_densities(attribution, shares if exact is None else shares_q, qi, grid, bandwidth)
                layer["ridge"] = {
                    "classes": classes,
                    "density": {str(c): _rounded(densities[c]) for c in classes if c in densities},
                }
                shown.update(e["example"] for e in layer.get("top_examples", []) + layer.get("opponents", []))
            entry["layers"][name] = layer
        doc["queries"].append(entry)
    if not privacy:
        test = {str(q.index): q.image for q in queries[:figures] if q.image is not None}
        train = {str(i): img for i in sorted(shown) if (img := _image(train_images, i)) is not None}
        for key, drawn in (("images", False), ("graphs", True)):  # arrays are images, mappings graph drawings
            parts = [
                {k: v if drawn else _rounded(v) for k, v in d.items() if is_drawing(v) == drawn} for d in (test, train)
            ]
            if parts[0] or parts[1]:
                doc[key] = {"test": parts[0], "train": parts[1]}
        if cladec is not None:
            reconstructions = {
                str(q): {k: _rounded(v) for k, v in r.items()} for q, r in cladec["reconstructions"].items()
            }
            doc["cladec"] = {**cladec, "reconstructions": reconstructions}
    return doc


def merge_documents(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from the documents of consecutive query batches (same trace and options)."""
    merged = {**docs[0], "queries": [q for doc in docs for q in doc["queries"]]}
    for key, parts in (("images", ("test", "train")), ("graphs", ("test", "train")), ("cladec", ("reconstructions",))):
        present = [doc[key] for doc in docs if key in doc]
        if present:
            merged[key] = {
                **present[0],
                **{part: {k: v for d in present for k, v in d[part].items()} for part in parts},
            }
    return merged


def _layer(
    trace: Trace, stop: int, a: LayerAttribution, qi: int, score: str, top_k: int, privacy: bool
) -> dict[str, Any]:
    steps, examples = trace.steps, trace.examples
    step_scores = (a.gamma if score == "gamma" else a.cos)[qi : qi + 1]
    rows = None if a.rows is None else a.rows[qi : qi + 1]  # a factored layer: each example's exact share
    per_example, labels = example_attribution(
        steps, examples, step_scores, stop, split=score == "gamma", rows=rows if score == "gamma" else None
    )
    # class scores are always shares of gamma (they add up to ||Z||^2 with init_score and unattributed_score)
    gamma_examples = (
        per_example
        if score == "gamma"
        else example_attribution(steps, examples, a.gamma[qi : qi + 1], stop, rows=rows)[0]
    )
    classes = class_attribution(gamma_examples, labels)
    doc: dict[str, Any] = {
        # exact: every example's own share of gamma (factored layer); else a step's gamma split equally
        "example_shares": "exact" if rows is not None else "equal split of each step",
        "class_scores": dict(sorted(((str(c), float(v[0])) for c, v in classes.items()), key=lambda kv: -kv[1])),
        "init_score": float(a.init[qi]),
        "norm_sq": float(a.z_sq[qi]),
        "completeness_residual": float(a.residual[qi]),
    }
    if a.unattributed is not None:  # storage="lowrank": the share of what the stored products lack
        doc["unattributed_score"] = float(a.unattributed[qi])
    if privacy:
        return doc
    s = per_example[0]
    seen = labels >= 0
    k = min(top_k, int(seen.sum()))
    order = torch.argsort(torch.where(seen, s, torch.full_like(s, -torch.inf)), descending=True)[:k]
    worst = torch.argsort(torch.where(seen, s, torch.full_like(s, torch.inf)))[:k]
    doc["top_examples"] = [_example(i, labels[i], s[i]) for i in order.tolist()]
    doc["opponents"] = [_example(i, labels[i], s[i]) for i in worst.tolist() if s[i] < 0]
    return doc


def _mixed_steps(trace: Trace, stop: int) -> float:
    """Share of the first ``stop`` steps whose real rows are of several classes (-1 labels with labelled rows)."""
    if not stop:
        return 0.0
    steps = trace.steps
    labelled = np.zeros(stop, dtype=bool)
    real = ~trace.examples.ghost[: int(steps.example_stop[stop - 1])]
    label = trace.examples.label
    if label.ndim == 1:
        has = real & (label[: len(real)] >= 0)
        row_step = np.repeat(np.arange(stop), steps.rows[:stop])
        labelled[np.unique(row_step[has])] = True
    return float(((steps.label[:stop] < 0) & labelled).mean())


def picture(x: Any) -> np.ndarray | None:
    """A (C, H, W) or (H, W) tensor as an image array; None for graphs and other inputs (shown as a table)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return None
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    return x.numpy()


def _image(images: Images | None, index: int) -> np.ndarray | dict[str, Any] | None:
    return None if images is None else images(index)


def _example(index: int, label: Tensor, score: Tensor) -> dict[str, Any]:
    return {"example": int(index), "label": int(label), "score": float(score)}


def _rounded(values: Any) -> Any:
    """Numbers rounded to 4 decimals, as (nested) lists: small JSON, no visible loss in a figure."""
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    return np.round(array, 4).tolist()
