"""The method's math as plain functions over tensors (no Lightning, no I/O).

The paper decomposes a traced weight into its initial value and the change of
every optimizer step, ``W = W_0 + sum_t D_t`` (DESIGN.md section 2). The
recorder and the trace reader call these functions; tests compare them with
slow references.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


def weight_deltas(
    after: Sequence[Tensor], before: Sequence[Tensor], out: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """``D_t = W_after - W_before`` for each parameter, in float32.

    ``before`` holds float32 copies; parameters of lower precision are promoted
    first, so the difference of two bf16/fp16 weights is represented exactly.
    With ``out`` (float32 tensors of the parameters' shapes, e.g. views of one
    flat staging buffer) the deltas are written there without allocating.
    """
    with torch.no_grad():
        if out is None:
            return list(torch._foreach_sub([a.detach().float() for a in after], list(before)))
        torch._foreach_copy_(list(out), [a.detach() for a in after])
        torch._foreach_sub_(list(out), list(before))
        return list(out)


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


def contribution_norms(
    layer: torch.nn.Module,
    xs: Sequence[Tensor],
    deltas: dict[str, Tensor],
    budget: int = 2**25,
) -> Tensor:
    """``||H_q D_t^T + d_t||`` for every query ``q`` and step ``t`` of a chunk, shape ``(Q, T)``.

    The layer's forward with ``D_t`` as weight, vmapped over the steps, on all queries at once:
    query inputs ``xs`` that agree in all but their first dimension (rows, nodes or a batch of one)
    are concatenated along it, and the squared outputs are summed back per query. ``budget``
    bounds the output elements held at once (queries are grouped and steps vmapped in chunks),
    so many queries cost a few large products instead of one small product each.
    """
    xs = [x if x.dim() > 1 else x.unsqueeze(0) for x in xs]  # an unbatched vector is one row
    steps = next(iter(deltas.values())).shape[0]
    device = next(iter(deltas.values())).device
    out = torch.zeros(len(xs), steps, device=device)
    if not xs:
        return out
    gram = _gram_norms(layer, xs, deltas, budget)
    if gram is not None:
        return gram
    groups: dict[tuple[Any, ...], list[int]] = {}
    for q, x in enumerate(xs):
        groups.setdefault((tuple(x.shape[1:]), x.dtype), []).append(q)
    probe = {k: v[0] for k, v in deltas.items()}
    for members in groups.values():
        per_row = layer_output(layer, xs[members[0]][:1], probe)[0].numel()  # output elements of one input row
        start = 0
        while start < len(members):  # queries of one group, as many as fit the budget for one step
            stop, size = start, 0
            while stop < len(members) and (stop == start or size + xs[members[stop]].shape[0] * per_row <= budget):
                size += xs[members[stop]].shape[0] * per_row
                stop += 1
            part = members[start:stop]
            x = torch.cat([xs[q] for q in part])
            seg = torch.repeat_interleave(
                torch.arange(len(part), device=device), torch.tensor([xs[q].shape[0] for q in part], device=device)
            )

            def one(*step: Tensor, x: Tensor = x) -> Tensor:
                z = layer_output(layer, x, dict(zip(deltas, step, strict=True)))
                return z.pow(2).reshape(z.shape[0], -1).sum(1)  # (rows,)

            sq = torch.vmap(one, chunk_size=max(1, budget // max(1, size)))(*deltas.values())  # (T, rows)
            per_query = torch.zeros(steps, len(part), device=device, dtype=sq.dtype).index_add_(1, seg, sq)
            out[torch.tensor(part, device=device)] = per_query.T.to(out.dtype)
            start = stop
    return out.sqrt()


def _input_rows(layer: torch.nn.Module, x: Tensor) -> Tensor | None:
    """``H``: the rows a plain Linear or Conv2d multiplies by its weight (unfolded patches), else None."""
    if type(layer) is torch.nn.Linear:
        return x.reshape(-1, x.shape[-1])
    if type(layer) is torch.nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros" and x.dim() == 4:
        if isinstance(layer.padding, str):
            return None
        cols = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (batch * positions, C * kh * kw)
    return None


def _gram_norms(layer: torch.nn.Module, xs: Sequence[Tensor], deltas: dict[str, Tensor], budget: int) -> Tensor | None:
    """``||H D^T + d||^2 = <D^T D, H^T H> + 2 <D^T d, sum_p h_p> + P ||d||^2``: two matrix products for all
    steps and queries, when that is cheaper than the layer's forward per step (few input features,
    many rows: early convolutions). Computed in float64 (the terms may cancel); None when it does not pay."""
    rows = [_input_rows(layer, x) for x in xs]
    if any(h is None for h in rows):
        return None
    weight = deltas["weight"]
    steps, n_out = weight.shape[0], weight.shape[1]
    n_in = rows[0].shape[1]  # type: ignore[union-attr]
    total_rows = sum(h.shape[0] for h in rows)  # type: ignore[union-attr]
    gram_cost = n_in * n_in * (n_out + len(xs))
    if 2 * gram_cost > total_rows * n_out * n_in or n_in * n_in * max(steps, len(xs)) > budget:
        return None
    d = weight.reshape(steps, n_out, n_in).double()
    h = [r.double() for r in rows]  # type: ignore[union-attr]
    k = torch.stack([r.T @ r for r in h]).reshape(len(xs), -1)  # (Q, in*in)
    sq = (d.transpose(1, 2) @ d).reshape(steps, -1) @ k.T  # (T, Q)
    if "bias" in deltas:
        b = deltas["bias"].double()  # (T, out)
        sums = torch.stack([r.sum(0) for r in h])  # (Q, in)
        count = torch.tensor([float(r.shape[0]) for r in h], dtype=torch.float64, device=b.device)
        sq = sq + 2 * (d.transpose(1, 2) @ b[:, :, None]).squeeze(2) @ sums.T + b.pow(2).sum(1, keepdim=True) * count
    return sq.clamp_min(0).sqrt().T.float()


# --------------------------------------------------------------------------- per-example factors (plain SGD)


def factored_deltas(inputs: Tensor, outputs: Tensor, counts: Sequence[int]) -> Tensor:
    """``D_t = sum_r outputs_r inputs_r^T`` over each step's rows: ``(T, out, in)`` from ``(R, in)``, ``(R, out)``.

    Under plain SGD a Linear layer's step is exactly this with ``outputs = -lr * dL/dZ`` and
    ``inputs`` the layer's input rows (DESIGN.md section 2); ``counts[t]`` rows belong to step ``t``.
    """
    counts = [int(c) for c in counts]
    if sum(counts) != inputs.shape[0] or inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} input and {outputs.shape[0]} output rows for steps of {sum(counts)} rows.")
    width = max(counts, default=0)
    a = inputs.new_zeros(len(counts), width, inputs.shape[1])
    g = outputs.new_zeros(len(counts), width, outputs.shape[1])
    step = _row_steps(counts)
    start = torch.tensor([0, *counts[:-1]], dtype=torch.long).cumsum(0)
    slot = torch.arange(inputs.shape[0]) - start[step]
    a[step, slot], g[step, slot] = inputs, outputs
    return torch.bmm(g.transpose(1, 2), a)


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
    is that step's gamma (eq. 6), so a mixed batch is split over its examples exactly. Rows are
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

    For :func:`row_gammas` this is each step's gamma again (a check of the per-example shares).
    """
    step = _row_steps(counts).to(row_values.device)
    out = row_values.new_zeros(row_values.shape[0], len(counts))
    return out.index_add_(1, step, row_values[:, : len(step)])


def _row_steps(counts: Sequence[int] | Tensor) -> Tensor:
    """The step of every row, for steps of ``counts[t]`` consecutive rows."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


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
