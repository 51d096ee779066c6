"""Low-rank steps: a weight change stored as a rank-r product ``D_t ~ P_t Q_t^T`` (``storage="lowrank"``).

A conv or linear weight of shape ``(out, in, *kernel)`` is viewed as the matrix
``(out, in * kernel)``. Each step's change is approximated the way PowerSGD
compresses gradients: one power iteration warm-started from the previous step's
``Q`` (docs/method.md, "Low-rank steps"). What the products miss is kept as a
residual, so the decomposition stays exact:
``W = W_0 + sum_t P_t Q_t^T + R`` and ``||Z||^2 = gamma_0 + sum_t gamma_t + <G, R>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """A weight's shape as the matrix its steps are factored in: ``(out, in * kernel)``."""
    return int(shape[0]), int(math.prod(shape[1:]))


def lowrank_pays(shape: Sequence[int], rank: int) -> bool:
    """True when a step's factors, ``rank * (out + in * kernel)`` values, are fewer than the weight's."""
    rows, cols = matrix_shape(shape)
    return rank * (rows + cols) < rows * cols


def power_step(matrix: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """One warm-started power iteration (PowerSGD): ``P = orth(M Q)``, ``Q' = M^T P``, so ``M ~ P Q'^T``.

    ``matrix`` is ``(m, n)``, ``q`` is ``(n, r)`` (the previous step's ``Q'``, or random at the first
    step). ``P`` has orthonormal columns, so ``P Q'^T`` is ``M``'s projection onto them: the best
    approximation within that column space.
    """
    p = matrix @ q
    p = torch.linalg.qr(p).Q if torch.isfinite(p).all() else p  # a diverged step stays NaN, and is flagged
    return p, matrix.T @ p


def lowrank_deltas(p: Tensor, q: Tensor, shape: Sequence[int]) -> Tensor:
    """Rebuild a chunk of steps ``(T, *shape)`` from ``P`` ``(T, out, r)`` and ``Q`` ``(T, in * kernel, r)``."""
    return torch.bmm(p, q.transpose(1, 2)).reshape(p.shape[0], *shape)


def lowrank_sum(p: Tensor, q: Tensor, shape: Sequence[int]) -> Tensor:
    """``sum_t P_t Q_t^T`` in float64 without rebuilding each step: one ``(out, T r) x (T r, in)`` product."""
    steps, rows, rank = p.shape
    left = p.double().permute(1, 0, 2).reshape(rows, steps * rank)
    right = q.double().permute(1, 0, 2).reshape(q.shape[1], steps * rank)
    return (left @ right.T).reshape(shape)


def lowrank_gammas(p: Tensor, q: Tensor, grads: Tensor) -> Tensor:
    """``gamma[q, t] = <P_t Q_t^T, G_q> = <P_t, G_q Q_t>`` for a chunk of steps, ``(Q, T)``.

    ``grads`` is ``(Q, *weight shape)``. The cheaper order is taken: ``G_q Q_t`` per query and step
    (``Q T out in r`` products) when there are fewer queries than the rank, else the rebuilt steps
    (``T out in r``) against every query at once (``Q T out in``).
    """
    g = grads.reshape(grads.shape[0], p.shape[1], q.shape[1]).to(p.dtype)
    if g.shape[0] < p.shape[2]:
        gq = torch.einsum("aom,tmr->ator", g, q)
        return torch.einsum("ator,tor->at", gq, p)
    d = torch.bmm(p, q.transpose(1, 2))
    return g.reshape(g.shape[0], -1) @ d.reshape(d.shape[0], -1).T
