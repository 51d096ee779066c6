"""Our method as a quanda explainer, so that an evaluator we did not write can judge it.

`quanda <https://github.com/dilyabareeva/quanda>`_ evaluates training-data attribution
methods from a score matrix ``(test samples, training examples)``.
:class:`TraceExplainer` computes it from a trace, per traced layer, with Algorithm 1:
``score="gamma"`` splits each step's share of the layer's pre-activation over the
step's real examples, ``score="cosine"`` gives each example the steps' cosines. The
method explains a layer's representation, not one class's output, so ``targets``
do not change the scores.

Two options address the top-k cardinality problem (the same few examples top
every query because the large updates of the first steps dominate), both off by
default: ``warmup_steps`` leaves the first steps out of the example scores, and
``per_step="contrast"`` divides each step's score by its mean magnitude over the
queries of the call, so a step counts by how much more it built this query's
representation than the others' (explain a batch of queries together).

``self_influence="opposed"`` turns the sign of quanda's self-influence (each
training example explaining itself), for mislabel detection: the steps that
trained on a mislabelled example pushed its representation towards the wrong
class, which the representation it ends with opposes, so its own score is the
most negative, not the highest.

quanda 0.5.0 pins ``captum<0.9``, which needs ``numpy<2``, which zarr 3.1 cannot use;
it runs with captum 0.9, so install it without its pins (README, "Judged by quanda")::

    pip install -e ".[eval]" && pip install --no-deps quanda==0.5.0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from quanda.explainers import Explainer as QuandaExplainer  # the optional dependency: pip install ... (above)
from torch import Tensor, nn

from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.trace import Trace

Score = Literal["gamma", "cosine"]


class TraceExplainer(QuandaExplainer):
    """Training-example scores of one traced layer from a trace, in quanda's explainer interface.

    Args:
        model: The trained model (the weights the trace ends with).
        train_dataset: The training dataset the trace's example ids index (its length sizes the score matrix).
        trace: A :class:`~lightning_tracetrain.Trace` or its path.
        layer: The traced layer whose pre-activation is explained.
        score: ``"gamma"`` (default) or ``"cosine"`` (Algorithm 1's two rankings).
        warmup_steps: Leave the first this many steps out of the scores (default 0: all steps).
        per_step: ``"contrast"``: each step's score over its mean absolute score across the call's queries;
            ``None`` (default): as computed.
        self_influence: ``"opposed"``: :meth:`self_influence` is minus each example's score for itself, so
            the examples whose own steps most opposed their final representation come first;
            ``"score"`` (default): the score itself, as quanda defines self-influence.

    Example:
        >>> from quanda.metrics.heuristics import TopKCardinalityMetric  # doctest: +SKIP
        >>> explainer = TraceExplainer(model, train_set, "runs/digits/trace", layer="net.fc2")  # doctest: +SKIP
        >>> metric = TopKCardinalityMetric(model, train_set, top_k=5)  # doctest: +SKIP
        >>> metric.update(explainer.explain(test_x, targets=test_y)); metric.compute()  # doctest: +SKIP
    """

    accepted_tasks: ClassVar[list[str]] = ["image_classification"]

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Any,
        trace: Trace | str | Path,
        layer: str,
        score: Score = "gamma",
        warmup_steps: int = 0,
        per_step: Literal["contrast"] | None = None,
        self_influence: Literal["score", "opposed"] = "score",
        **kwargs: Any,
    ) -> None:
        if score not in ("gamma", "cosine"):
            raise ValueError(f"Unknown score {score!r}: use 'gamma' or 'cosine'.")
        if per_step not in (None, "contrast"):
            raise ValueError(f"Unknown per_step {per_step!r}: use None or 'contrast'.")
        if self_influence not in ("score", "opposed"):
            raise ValueError(f"Unknown self_influence {self_influence!r}: use 'score' or 'opposed'.")
        super().__init__(model=model, train_dataset=train_dataset, **kwargs)
        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        self.layer = self.trace.layer(layer).name  # an unknown layer: the error lists the traced ones
        if not 0 <= warmup_steps < self.trace.num_steps:
            raise ValueError(
                f"warmup_steps must be between 0 and {self.trace.num_steps - 1} (the trace's steps), "
                f"got {warmup_steps}."
            )
        self.score, self.warmup_steps, self.per_step = score, warmup_steps, per_step
        self.self_influence_sign = -1.0 if self_influence == "opposed" else 1.0
        self.explainer = Explainer(model, self.trace, layers=[self.layer], norms=score == "cosine")

    def explain(self, test_data: Tensor, targets: Any = None) -> Tensor:
        """``(len(test_data), len(train_dataset))`` scores; examples the trace never saw score 0."""
        queries = [{"x": x[None]} for x in test_data]
        result = self.explainer.explain(queries)[self.layer]
        steps = (result.gamma if self.score == "gamma" else result.cos).clone()
        steps[:, : self.warmup_steps] = 0.0
        if self.per_step == "contrast":
            steps = steps / steps.abs().mean(0, keepdim=True).clamp_min(torch.finfo(steps.dtype).tiny)
        exact = self.score == "gamma" and result.rows is not None and self.per_step is None
        rows = result.rows.clone() if exact else None
        if rows is not None and self.warmup_steps:  # a factored layer: each row's exact share
            rows[:, : int(self.trace.steps.example_stop[self.warmup_steps - 1])] = 0.0
        scores, _ = example_attribution(
            self.trace.steps, self.trace.examples, steps, self.explainer.stop, split=self.score == "gamma", rows=rows
        )
        out = torch.zeros(len(queries), len(self.train_dataset), dtype=torch.float32)
        out[:, : scores.shape[1]] = scores.float()
        return out.to(test_data.device)

    def self_influence(self, batch_size: int = 32) -> Tensor:
        """Each training example's score for itself (quanda's definition), minus it with ``"opposed"``."""
        return self.self_influence_sign * super().self_influence(batch_size=batch_size)
