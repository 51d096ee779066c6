"""Quality measures of training-data attribution used by the evaluation, as plain functions over tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def identical_class(scores: Tensor, train_labels: Tensor, predicted: Tensor, k: int = 1) -> float:
    """Share of the ``k`` highest-scoring training examples that have the query's predicted class (mean over queries).

    ``scores`` is ``(Q, n)``; examples with label -1 (never trained on) are ignored (Hanawa et al., ICLR 2021).
    """
    scores = scores.double().masked_fill(train_labels[None, :] < 0, -torch.inf)
    top = scores.topk(k, dim=1).indices
    return float((train_labels[top] == predicted[:, None]).double().mean())


def detection_rate(self_influence: Tensor, flipped: Tensor, fraction: float) -> float:
    """Share of the flipped examples among the ``fraction`` of examples with the highest self-influence."""
    k = round(fraction * len(self_influence))
    top = torch.argsort(self_influence.double(), descending=True, stable=True)[:k]
    return float(torch.isin(top, flipped).sum() / max(len(flipped), 1))


def class_share(scores: Tensor, labels: Tensor, predicted: Tensor) -> float:
    """Mean share of the positive example scores that go to the query's predicted class."""
    positive = scores.clamp_min(0)
    own = torch.stack([positive[q, labels == c].sum() for q, c in enumerate(predicted.tolist())])
    return float((own / positive.sum(1).clamp_min(1e-30)).mean())


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (ties broken by position): how well one ranking keeps
    another, e.g. the per-step gamma of a lossy trace against a lossless one."""
    ra, rb = (x.double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))
