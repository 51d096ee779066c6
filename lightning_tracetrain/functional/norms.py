"""Contribution norms ``||H D_t^T + d_t||``: the size of a step's change to a query's pre-activation.

They turn gamma into the cosine of eq. 7 and weigh the ridge plots of Algorithm 3.
Three ways to compute them, all for a whole chunk of steps and every query at once:
the layer's forward with ``D_t`` as weight (any linear layer), the Gram identity
(plain Linear and Conv2d with few input features), and, for a factored Linear layer,
straight from its per-example rows without rebuilding ``D_t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tracetrain.functional.delta import padded_steps
from lightning_tracetrain.functional.gamma import layer_output


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
    gram = gram_norms(layer, xs, deltas, budget)
    if gram is not None:
        return gram
    groups: dict[tuple[Any, ...], list[int]] = {}
    for q, x in enumerate(xs):
        groups.setdefault((tuple(x.shape[1:]), x.dtype), []).append(q)
    probe = {k: v[0] for k, v in deltas.items()}
    for members in groups.values():
        per_row = layer_output(layer, xs[members[0]][:1], probe)[0].numel()  # output elements of one input row
        for part in _blocks(members, [xs[q].shape[0] * per_row for q in members], budget):
            x = torch.cat([xs[q] for q in part])
            seg = _owners([xs[q].shape[0] for q in part], device)

            def one(*step: Tensor, x: Tensor = x) -> Tensor:
                z = layer_output(layer, x, dict(zip(deltas, step, strict=True)))
                return z.pow(2).reshape(z.shape[0], -1).sum(1)  # (rows,)

            size = x.shape[0] * per_row
            sq = torch.vmap(one, chunk_size=max(1, budget // max(1, size)))(*deltas.values())  # (T, rows)
            per_query = torch.zeros(steps, len(part), device=device, dtype=sq.dtype).index_add_(1, seg, sq)
            out[torch.tensor(part, device=device)] = per_query.T.to(out.dtype)
    return out.sqrt()


def factored_norms(
    inputs: Tensor,
    outputs: Tensor,
    counts: Sequence[int],
    bias: Tensor | None,
    xs: Sequence[Tensor],
    budget: int = 2**25,
) -> Tensor:
    """``||H_q D_t^T + d_t||`` of a factored Linear layer from its rows, ``(Q, T)``, never building ``D_t``.

    With ``D_t = sum_r outputs_r inputs_r^T`` over the step's rows, ``H D_t^T = (H A_t^T) O_t``:
    ``T * rows * W * (in + out)`` work for steps of at most ``W`` rows instead of ``W * in * out`` per
    step to rebuild them. ``bias`` is the chunk's bias deltas ``(T, out)`` or None.
    """
    a, o = padded_steps(inputs, outputs, counts)  # (T, W, in), (T, W, out)
    rows = [x.reshape(-1, x.shape[-1]).to(a.dtype) for x in xs]
    out = torch.zeros(len(rows), len(counts), device=a.device, dtype=torch.float64)
    per_row = len(counts) * max(a.shape[1], o.shape[2], 1)
    for part in _blocks(list(range(len(rows))), [h.shape[0] * per_row for h in rows], budget):
        h = torch.cat([rows[q] for q in part])  # (P, in)
        c = torch.einsum("pi,twi->tpw", h, a) @ o  # (T, P, out): H D_t^T
        if bias is not None:
            c = c + bias[:, None, :].to(c.dtype)
        sq = c.double().pow(2).sum(-1)  # (T, P)
        owners = _owners([rows[q].shape[0] for q in part], a.device)
        out[torch.tensor(part, device=a.device)] = (
            torch.zeros(len(counts), len(part), device=a.device, dtype=torch.float64).index_add_(1, owners, sq).T
        )
    return out.sqrt().float()


def input_rows(layer: torch.nn.Module, x: Tensor) -> Tensor | None:
    """``H``: the rows a plain Linear or Conv2d multiplies by its weight (unfolded patches), else None."""
    if type(layer) is torch.nn.Linear:
        return x.reshape(-1, x.shape[-1])
    if type(layer) is torch.nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros" and x.dim() == 4:
        if isinstance(layer.padding, str):
            return None
        cols = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (batch * positions, C * kh * kw)
    return None


def gram_norms(layer: torch.nn.Module, xs: Sequence[Tensor], deltas: dict[str, Tensor], budget: int) -> Tensor | None:
    """``||H D^T + d||^2 = <D^T D, H^T H> + 2 <D^T d, sum_p h_p> + P ||d||^2``: two matrix products for all
    steps and queries, when that is cheaper than the layer's forward per step (few input features,
    many rows: early convolutions). Computed in float64 (the terms may cancel); None when it does not pay."""
    rows = [input_rows(layer, x) for x in xs]
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


def _blocks(members: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of ``members`` whose ``sizes`` add up to at most ``budget`` (at least one each)."""
    blocks: list[list[int]] = []
    total = 0
    for member, size in zip(members, sizes, strict=True):
        if blocks and total + size <= budget:
            blocks[-1].append(member)
            total += size
        else:
            blocks.append([member])
            total = size
    return blocks


def _owners(sizes: list[int], device: torch.device) -> Tensor:
    """For rows of consecutive owners of ``sizes[i]`` rows each: the owner of every row."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
