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


# --------------------------------------------------------------------------- attribution (eq. 6, 7; Algorithms 1, 3)


def layer_output(layer: torch.nn.Module, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """The layer's pre-activation ``Z = H W^T + b`` for input ``x`` with the given weight (and bias)."""
    return torch.func.functional_call(layer, params, (x,))


def query_gradient(layer: torch.nn.Module, x: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """``Z`` and ``G = d(0.5 ||Z||^2) / d(W, b)`` at ``params``, by autograd on the layer alone.

    By the query-gradient identity, ``gamma_t = <D_t, G_W> + <d_t, G_b>`` for
    every step: strides, padding, groups and dilation are handled by autograd.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        z = layer_output(layer, x.detach(), leaves)
        grads = torch.autograd.grad(0.5 * z.pow(2).sum(), list(leaves.values()))
    return z.detach(), dict(zip(leaves, grads, strict=True))


def step_gammas(deltas: dict[str, Tensor], grads: dict[str, Tensor]) -> Tensor:
    """``gamma[t, q] = <D_t, G_W,q> + <d_t, G_b,q>`` for a chunk of steps and all queries (eq. 6).

    ``deltas[p]`` has shape ``(T, *param)``, ``grads[p]`` shape ``(Q, *param)``;
    one matrix product per parameter serves every query.
    """
    gamma = None
    for name, d in deltas.items():
        g = grads[name].to(d.dtype)
        part = d.reshape(d.shape[0], -1) @ g.reshape(g.shape[0], -1).T
        gamma = part if gamma is None else gamma + part
    assert gamma is not None, "a traced layer has at least a weight"
    return gamma


def contribution_norms(layer: torch.nn.Module, x: Tensor, deltas: dict[str, Tensor]) -> Tensor:
    """``||H D_t^T + d_t||`` for every step of a chunk: the layer's forward with ``D_t`` as weight."""

    def one(*step: Tensor) -> Tensor:
        return layer_output(layer, x, dict(zip(deltas, step, strict=True))).pow(2).sum()

    return torch.vmap(one)(*deltas.values()).sqrt()


def cosines(gamma: Tensor, z_norm: Tensor, contribution: Tensor) -> Tensor:
    """``cos_t = gamma_t / (||Z|| ||H D_t^T + d_t||)`` (eq. 7), zero where a step changed nothing."""
    denom = z_norm * contribution
    return torch.where(denom > 0, gamma / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(gamma))


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
    total = weights.sum()
    if total <= 0 or values.numel() == 0:
        return torch.zeros_like(grid)
    u = (grid[:, None] - values[None, :]) / bandwidth
    kernel = torch.exp(-0.5 * u.pow(2)) / (bandwidth * (2 * torch.pi) ** 0.5)
    return (kernel * (weights / total)[None, :]).sum(1)
