"""Each step of the low-rank layers as a rank-r product, on the training device (``storage="lowrank"``).

:class:`LowRankSteps` keeps, per layer, the weight before the step, the warm start ``Q`` of the
power iteration and the residual ``R`` (what the stored products lack). After a step it turns
the weight change ``D_t`` into ``P_t, Q_t`` and updates ``R += D_t - P_t Q_t^T``, so that
``W_t = W_0 + sum_s P_s Q_s^T + R`` holds after every step. With ``feedback`` the step's product
approximates ``D_t + R`` instead (error feedback, as PowerSGD does): ``R`` stays about one step's
error, but part of a step's change is attributed to a later step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_tracetrain import functional as Fx

SEED = 20220222  # each layer's first Q is randn from this seed: two runs of the same training store the same trace


def choose_lowrank(shapes: Mapping[str, Sequence[int]], rank: int) -> tuple[str, ...]:
    """The layers (by weight shape) whose rank-``rank`` factors are smaller than their weight."""
    return tuple(name for name, shape in shapes.items() if len(shape) >= 2 and Fx.lowrank_pays(shape, rank))


class LowRankSteps:
    """Turns each step of the low-rank weights into factors ``P_t, Q_t`` and keeps the residual.

    Args:
        weights: The low-rank layers' weights, by layer name (in the trace's order).
        before: float32 copies of those weights as of the last recorded step (updated in place).
        rank: The rank of each step's product.
        feedback: Carry the residual into the next step's product (error feedback).
        carry: The residuals a checkpoint kept (:meth:`carry`), to resume; None starts at zero.
    """

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        before: Mapping[str, Tensor],
        rank: int,
        feedback: bool,
        carry: np.ndarray | None = None,
    ) -> None:
        self.names = list(weights)
        self._weights = [weights[n] for n in self.names]
        self._before = [before[n] for n in self.names]
        self._feedback = feedback
        self._q: list[Tensor] = []
        self._residual: list[Tensor] = []
        for w in self._weights:
            _, cols = Fx.matrix_shape(w.shape)
            self._q.append(torch.randn(cols, rank, generator=torch.Generator().manual_seed(SEED)).to(w.device))
            self._residual.append(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        if carry is not None:
            self._load(carry)

    def shapes(self) -> list[tuple[int, int]]:
        """The shapes of what :meth:`step` returns: ``(out, r)`` and ``(in * kernel, r)`` per layer."""
        out: list[tuple[int, int]] = []
        for w, q in zip(self._weights, self._q, strict=True):
            rows, cols = Fx.matrix_shape(w.shape)
            out += [(rows, q.shape[1]), (cols, q.shape[1])]
        return out

    @torch.no_grad()
    def step(self) -> list[Tensor]:
        """After an optimizer step: ``[P, Q]`` of every layer (float32, on the device); updates ``R`` and ``before``.

        Each weight is passed over a few times only: the delta is formed once, the residual takes it and
        gives back the product in one fused ``addmm_``.
        """
        out = []
        for i, (w, before) in enumerate(zip(self._weights, self._before, strict=True)):
            shape = Fx.matrix_shape(w.shape)
            delta = torch.sub(w.detach(), before).reshape(shape)  # float32, as before is
            residual = self._residual[i].view(shape)
            if self._feedback:
                delta.add_(residual)  # the step plus what earlier products missed
                residual.zero_()
            p, q = Fx.power_step(delta, self._q[i])
            residual.add_(delta).addmm_(p, q.T, alpha=-1.0)
            before.copy_(w.detach())
            self._q[i] = torch.where(torch.isfinite(q), q, self._q[i])  # a diverged step does not poison the next
            out += [p, q]
        return out

    def residuals(self) -> dict[str, np.ndarray]:
        """Each layer's residual ``R`` as of the last step (host copies)."""
        return {n: r.cpu().numpy().copy() for n, r in zip(self.names, self._residual, strict=True)}

    def carry(self) -> np.ndarray:
        """The residuals and warm starts, flattened and concatenated: what a checkpoint keeps, so that a resumed
        run stores the very steps an uninterrupted one would."""
        parts = [t.cpu().numpy().ravel() for t in (*self._residual, *self._q)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def _load(self, carry: np.ndarray) -> None:
        targets = [*self._residual, *self._q]
        sizes = [t.numel() for t in targets]
        if carry.shape != (sum(sizes),):
            raise ValueError(
                f"The checkpoint's low-rank state holds {carry.size} values, the traced low-rank layers "
                f"{', '.join(self.names)} need {sum(sizes)}: the checkpoint is from another model or rank."
            )
        for t, part in zip(targets, np.split(carry.astype(np.float32), np.cumsum(sizes)[:-1]), strict=True):
            t.copy_(torch.from_numpy(part).reshape(t.shape))
