"""The method's math as plain functions over tensors (no Lightning, no I/O).

The paper decomposes a traced weight into its initial value and the change of
every optimizer step, ``W = W_0 + sum_t D_t`` (DESIGN.md section 2). The
recorder and the trace reader call these functions; tests compare them with
slow references.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def weight_deltas(after: Sequence[Tensor], before: Sequence[Tensor]) -> list[Tensor]:
    """``D_t = W_after - W_before`` for each parameter, in float32.

    ``before`` holds float32 copies; parameters of lower precision are promoted
    first, so the difference of two bf16/fp16 weights is represented exactly.
    """
    return list(torch._foreach_sub([a.detach().float() for a in after], list(before)))


def accumulate(initial: Tensor, deltas: Iterable[Tensor]) -> Tensor:
    """``W_0 + sum_t D_t`` summed in float64 and returned in ``initial``'s dtype.

    ``deltas`` may be an iterable of stacked chunks (leading step axis) so a
    long trace is summed without holding it in memory at once.
    """
    total = initial.double().clone()
    for chunk in deltas:
        total += chunk.double().reshape(-1, *initial.shape).sum(0)
    return total.to(initial.dtype)


# --------------------------------------------------------------------------- ghost samples (Algorithm 2)


def ghost_moments(x: Tensor, ghost: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Batch-norm mean and (biased) variance of a single-class batch with ghost samples.

    Every ghost row weighs 1 and the real rows weigh 1 in total, so with ``G``
    ghosts, real-row moments ``mb, vb`` and ghost moments ``mg, vg`` (over the
    rows and the positions in ``dims``)::

        mu  = mg + (mb - mg) / (1 + G)
        var = c*vg + vb/(1 + G) + c*(mg - mb)**2/(1 + G),   c = G/(1 + G)

    This is the paper's Algorithm 2 with its two typos corrected (it moves
    ``mu`` the wrong way and drops ``1/(1+G)`` on ``vb``; DESIGN.md section 2).
    ``x`` has rows on axis 0; ``ghost`` is a bool mask over the rows with at
    least one real and one ghost row. Returns tensors of the reduced shape.
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
