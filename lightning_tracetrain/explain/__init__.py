"""Explaining a trained model by its trace: which steps, examples and classes built each layer's representation.

- :mod:`~lightning_tracetrain.explain.explainer`: :class:`Explainer`, the LightningModule that makes the pass;
- :mod:`~lightning_tracetrain.explain.chunks`: the trace's chunks as a DataLoader;
- :mod:`~lightning_tracetrain.explain.attribution`: per chunk, and up to examples and classes (Algorithms 1, 3);
- :mod:`~lightning_tracetrain.explain.loading`: model and datamodule from a trace and checkpoint, safely;
- :mod:`~lightning_tracetrain.explain.arguments`, :mod:`~lightning_tracetrain.explain.cli`: ``python -m
  lightning_tracetrain.explain``;
- :mod:`~lightning_tracetrain.explain.document`, :mod:`~lightning_tracetrain.explain.report`: ``influence.json``
  and ``report.html``.
"""

from lightning_tracetrain.explain.arguments import ExplainArguments
from lightning_tracetrain.explain.attribution import (
    LayerAttribution,
    class_attribution,
    example_attribution,
    ridge_densities,
)
from lightning_tracetrain.explain.cli import explain
from lightning_tracetrain.explain.explainer import Explainer
from lightning_tracetrain.explain.loading import Trust, load_datamodule, load_model

__all__ = [
    "ExplainArguments",
    "Explainer",
    "LayerAttribution",
    "Trust",
    "class_attribution",
    "example_attribution",
    "explain",
    "load_datamodule",
    "load_model",
    "ridge_densities",
]
