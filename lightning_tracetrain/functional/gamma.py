"""gamma: how much a step contributed to a layer's pre-activation for a query (the paper's eq. 6 and 7).

For a traced layer with input rows ``H`` and pre-activation ``Z = H W^T + b``,
step ``t`` contributes ``gamma_t = <Z, H D_t^T + d_t>``, and with the
initialization's share ``gamma_0 = <Z, H W_0^T + b_0>`` the shares add up to
``||Z||^2`` exactly (docs/method.md, "Completeness"). By the query-gradient
identity ``gamma_t = <D_t, G_W> + <d_t, G_b>``, so one matrix product per chunk
serves every step and every query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tracetrain.functional.delta import row_steps


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
    if not deltas:
        raise ValueError("step_gammas needs at least one parameter's deltas.")
    parts = []
    for name, d in deltas.items():
        g = grads[name].to(d.dtype)
        parts.append(d.reshape(d.shape[0], -1) @ g.reshape(g.shape[0], -1).T)
    return torch.stack(parts).sum(0)


def row_gammas(
    inputs: Tensor,
    outputs: Tensor,
    query_inputs: Sequence[Tensor],
    query_outputs: Sequence[Tensor],
    bias: bool = True,
    budget: int = 2**25,
) -> Tensor:
    """Each example row's exact share of gamma for a factored Linear layer, ``(Q, R)``.

    The share of row ``r`` is ``<G_W, outputs_r inputs_r^T> + <G_b, outputs_r>``. For a Linear layer
    the query gradient is ``G_W = Z^T H`` and ``G_b = sum_p Z_p`` over the query's rows ``h_p, z_p``
    (its input and pre-activation), so the share is ``sum_p (outputs_r . z_p) (inputs_r . h_p + 1)``:
    ``R * (in + out)`` work per query row instead of ``R * in * out``. Summed over a step's rows it
    is that step's gamma (eq. 6), so a mixed batch is split over its examples exactly. With
    ``bias=False`` only the weight's part ``<G_W, outputs_r inputs_r^T>`` is given. Rows are
    processed in blocks of at most ``budget`` products.
    """
    h = torch.cat([x.reshape(-1, x.shape[-1]) for x in query_inputs]).to(outputs.dtype)
    z = torch.cat([y.reshape(-1, y.shape[-1]) for y in query_outputs]).to(outputs.dtype)
    sizes = torch.tensor([x.reshape(-1, x.shape[-1]).shape[0] for x in query_inputs], device=h.device)
    owner = torch.repeat_interleave(torch.arange(len(query_inputs), device=h.device), sizes)
    gamma = outputs.new_zeros(len(query_inputs), inputs.shape[0])
    block = max(1, budget // max(1, h.shape[0]))
    for first in range(0, inputs.shape[0], block):
        rows = slice(first, first + block)
        prod = (outputs[rows] @ z.T) * (inputs[rows] @ h.T + (1.0 if bias else 0.0))  # (rows, query rows)
        gamma[:, rows] = gamma.new_zeros(len(query_inputs), prod.shape[0]).index_add_(0, owner, prod.T)
    return gamma


def step_sums(row_values: Tensor, counts: Sequence[int] | Tensor) -> Tensor:
    """Per step, the sum of its rows' values: ``(Q, R)`` and row counts ``(T,)`` give ``(Q, T)``.

    For :func:`row_gammas` this is each step's gamma again.
    """
    step = row_steps(counts).to(row_values.device)
    out = row_values.new_zeros(row_values.shape[0], len(counts))
    return out.index_add_(1, step, row_values[:, : len(step)])


def cosines(gamma: Tensor, z_norm: Tensor, contribution: Tensor) -> Tensor:
    """``cos_t = gamma_t / (||Z|| ||H D_t^T + d_t||)`` (eq. 7), zero where a step changed nothing."""
    denom = z_norm * contribution
    return torch.where(denom > 0, gamma / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(gamma))
