"""Ghost samples: batch-norm statistics of single-class batches (the paper's Algorithm 2, corrected)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def ghost_moments(x: Tensor, ghost: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Batch-norm mean and (biased) variance of a single-class batch with ghost samples.

    Every ghost row weighs 1 and the real rows weigh 1 in total, so with ``G``
    ghosts, real-row moments ``mb, vb`` and ghost moments ``mg, vg`` (over the
    rows and the positions in ``dims``)::

        mu  = mg + (mb - mg) / (1 + G)
        var = c*vg + vb/(1 + G) + c*(mg - mb)**2/(1 + G),   c = G/(1 + G)

    This is the paper's Algorithm 2 with its two typos corrected (it moves
    ``mu`` the wrong way and drops ``1/(1+G)`` on ``vb``; docs/method.md,
    "Ghost-sample batch norm"). ``x`` has rows on axis 0; ``ghost`` is a bool
    mask over the rows with at least one real and one ghost row. Returns
    tensors of the reduced shape.
    """
    real, ghosts = x[~ghost], x[ghost]
    g = float(ghosts.shape[0])
    mb, mg = real.mean(dims), ghosts.mean(dims)
    vb, vg = real.var(dims, unbiased=False), ghosts.var(dims, unbiased=False)
    c = g / (1.0 + g)
    mu = mg + (mb - mg) / (1.0 + g)
    var = c * vg + vb / (1.0 + g) + c * (mg - mb) ** 2 / (1.0 + g)
    return mu, var


def real_cross_entropy(logits: Tensor, target: Tensor, ghost: Tensor | None) -> Tensor:
    """Mean cross entropy over the real (non-ghost) rows of a batch.

    Ghost rows only shape batch-norm statistics; they take no part in the loss.
    A batch without real rows (possible on a DDP rank for a tiny class) gives a
    zero that still depends on the parameters, so every rank joins the gradient
    all-reduce.
    """
    if ghost is None:
        return torch.nn.functional.cross_entropy(logits, target)
    real = ~ghost.reshape(-1)
    if not bool(real.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[real], target.reshape(-1)[real])
