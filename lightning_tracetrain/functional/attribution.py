"""From per-step scores to examples and classes (the paper's Algorithms 1 and 3), over plain tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def example_scores(
    step_scores: Tensor, row_step: Tensor, row_index: Tensor, row_weight: Tensor, num_examples: int
) -> Tensor:
    """Algorithm 1: per training example, the weighted sum of the scores of the steps it took part in.

    ``step_scores`` is ``(Q, steps)``; every example row ``r`` (a real row of
    step ``row_step[r]``, example ``row_index[r]``) adds
    ``row_weight[r] * step_scores[:, row_step[r]]``. With ``row_weight = 1/n_real``
    a step's gamma is split equally over its real examples.
    """
    values = step_scores[:, row_step] * row_weight.to(step_scores.dtype)
    out = torch.zeros(step_scores.shape[0], num_examples, dtype=step_scores.dtype, device=step_scores.device)
    return out.index_add_(1, row_index, values)


def weighted_kde(values: Tensor, weights: Tensor, grid: Tensor, bandwidth: float = 0.1) -> Tensor:
    """Gaussian kernel density of ``values`` with ``weights`` on ``grid`` (Algorithm 3's ridge rows).

    Normalized to integrate to one; all zero when the weights sum to zero.
    """
    if not bandwidth > 0:
        raise ValueError(f"The KDE bandwidth must be positive, got {bandwidth}.")
    total = weights.sum()
    if total <= 0 or values.numel() == 0:
        return torch.zeros_like(grid)
    u = (grid[:, None] - values[None, :]) / bandwidth
    kernel = torch.exp(-0.5 * u.pow(2)) / (bandwidth * (2 * torch.pi) ** 0.5)
    return (kernel * (weights / total)[None, :]).sum(1)


def predicted_class_share(gamma: Tensor, step_labels: Tensor, predicted: Tensor) -> Tensor:
    """Per query: positive gamma from steps of the predicted class over all positive gamma (class specificity).

    ``gamma`` is ``(Q, steps)``, ``step_labels`` the class of each (single-class) step, ``predicted`` ``(Q,)``.
    """
    positive = gamma.clamp_min(0).double()
    own = positive * (step_labels[None, :] == predicted[:, None])
    return own.sum(1) / positive.sum(1).clamp_min(1e-300)


def step_class_shares(rows_per_step: Tensor, labels: Tensor, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """``(steps, classes)``: how much of each step belongs to each class, each row summing to 1 (or 0).

    ``rows_per_step`` counts each step's example rows (in order), ``labels`` gives each row's class
    (``-1``: not counted, e.g. ghost rows or rows without a label). A row counts 1, or ``weights[row]``
    (e.g. the absolute value of its exact share of gamma). A single-class step is one-hot; a step of a
    shuffled batch is split by its rows' classes, so every step can be drawn in the ridge plots.
    """
    steps = len(rows_per_step)
    step_of_row = torch.repeat_interleave(torch.arange(steps), rows_per_step.long())
    weight = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double().abs()
    keep = (labels >= 0) & (labels < num_classes)
    shares = torch.zeros(steps * num_classes, dtype=torch.float64)
    shares.index_add_(0, step_of_row[keep] * num_classes + labels[keep].long(), weight[keep])
    shares = shares.view(steps, num_classes)
    return shares / shares.sum(1, keepdim=True).clamp_min(1e-300)
