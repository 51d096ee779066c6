"""The trace's unit: a step's weight change ``D_t``, and the weights it adds up to.

The paper decomposes a traced weight into its initial value and the change of
every optimizer step, ``W = W_0 + sum_t D_t`` (docs/method.md, "Decomposition").
Under plain SGD a Linear layer's ``D_t`` is a sum of per-example outer products
(docs/method.md, "Per-example factors"); these functions rebuild and sum both forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def factored_deltas(inputs: Tensor, outputs: Tensor, counts: Sequence[int]) -> Tensor:
    """``D_t = sum_r outputs_r inputs_r^T`` over each step's rows: ``(T, out, in)`` from ``(R, in)``, ``(R, out)``.

    Under plain SGD a Linear layer's step is exactly this with ``outputs = -lr * dL/dZ`` and
    ``inputs`` the layer's input rows; ``counts[t]`` rows belong to step ``t``.
    """
    a, g = padded_steps(inputs, outputs, counts)
    return torch.bmm(g.transpose(1, 2), a)


def factored_sum(inputs: Tensor, outputs: Tensor) -> Tensor:
    """``sum_t D_t`` of factored steps without rebuilding them: ``outputs^T inputs`` in float64."""
    return outputs.double().T @ inputs.double()


def padded_steps(inputs: Tensor, outputs: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Each step's rows in a zero-padded block: ``(T, W, in)`` and ``(T, W, out)`` with ``W = max(counts)``."""
    counts = [int(c) for c in counts]
    if sum(counts) != inputs.shape[0] or inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} input and {outputs.shape[0]} output rows for steps of {sum(counts)} rows.")
    width = max(counts, default=0)
    a = inputs.new_zeros(len(counts), width, inputs.shape[1])
    g = outputs.new_zeros(len(counts), width, outputs.shape[1])
    step = row_steps(counts).to(inputs.device)
    start = torch.tensor([0, *counts[:-1]], dtype=torch.long, device=inputs.device).cumsum(0)
    slot = torch.arange(inputs.shape[0], device=inputs.device) - start[step]
    a[step, slot], g[step, slot] = inputs, outputs
    return a, g


def row_steps(counts: Sequence[int] | Tensor) -> Tensor:
    """The step of every row, for steps of ``counts[t]`` consecutive rows."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
