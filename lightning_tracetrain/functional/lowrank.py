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

from lightning_tracetrain.functional.gamma import row_gammas, step_sums


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
    p = torch.linalg.qr(torch.nan_to_num(matrix @ q, nan=0.0, posinf=0.0, neginf=0.0)).Q  # no host sync
    return p, matrix.T @ p  # a diverged step: Q' holds its NaN or infinity, and the trace flags the step


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


def lowrank_row_gammas(p: Tensor, q: Tensor, query_inputs: Sequence[Tensor], query_outputs: Sequence[Tensor]) -> Tensor:
    """:func:`lowrank_gammas` of a linear layer (2-d weight) from the queries' rows, ``(Q, T)``.

    Its query gradient is ``G = Z^T H`` over the query's input and pre-activation rows, so
    ``<P_t Q_t^T, G> = sum_k sum_p (P_t[:, k] . z_p) (Q_t[:, k] . h_p)``: each rank component is a
    row of :func:`~lightning_tracetrain.functional.row_gammas`, ``r (out + in)`` work per step and query
    row instead of ``out * in``.
    """
    steps, rows, rank = p.shape
    outputs = p.transpose(1, 2).reshape(steps * rank, rows)
    inputs = q.transpose(1, 2).reshape(steps * rank, q.shape[1])
    return step_sums(row_gammas(inputs, outputs, query_inputs, query_outputs, bias=False), [rank] * steps)


def row_form_pays(p: Tensor, q: Tensor, query_rows: int, queries: int) -> bool:
    """Whether :func:`lowrank_row_gammas` (``r * query_rows * (out + in)`` per step) beats rebuilding each step
    and multiplying it with every query's gradient (``out * in * (r + queries)``)."""
    rows, cols, rank = p.shape[1], q.shape[1], p.shape[2]
    return rank * query_rows * (rows + cols) < rows * cols * (rank + queries)
