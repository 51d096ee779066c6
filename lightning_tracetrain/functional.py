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
