"""Ghost-sample batch norm (the paper's Algorithm 2, corrected).

Single-class batches would make batch norm push apart features that should be
alike. Ghost samples, drawn from all classes by their prior, are appended to
each batch; batch norm then normalizes with statistics in which every ghost
weighs 1 and the real rows weigh 1 in total (:func:`~lightning_tracetrain.functional.ghost_moments`).
Ghosts take no part in the loss.

The modules are drop-in ``BatchNorm1d/2d`` subclasses. The ghost mask comes as
``forward(x, ghost_mask)`` or, for models such as ``nn.Sequential`` that cannot
pass it, from :func:`set_ghost_mask`, which the single-class datamodule mixin
calls for every training batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tracetrain.functional import ghost_moments


class _GhostMixin:
    """Batch norm whose training statistics weigh ghost rows as Algorithm 2 prescribes."""

    ghost_mask: Tensor | None = None  # set by set_ghost_mask; used when forward() gets no mask
    _mask_attr = "ghost_mask"

    def forward(self, x: Tensor, ghost_mask: Tensor | None = None) -> Tensor:
        bn: Any = self
        bn._check_input_dim(x)
        mask = ghost_mask if ghost_mask is not None else getattr(self, self._mask_attr)
        if not bn.training or mask is None:
            return super().forward(x)  # type: ignore[misc]
        mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        if mask.shape[0] != x.shape[0]:
            raise ValueError(
                f"{type(self).__name__} got a ghost mask of {mask.shape[0]} rows for an input of {x.shape[0]} rows; "
                "for node features of a graph batch use GhostBatchNormNodes (convert_batchnorm(..., nodes=...))."
            )
        if not bool(mask.any()) or bool(mask.all()):
            return super().forward(x)  # type: ignore[misc]  # no ghosts (or no real rows): ordinary batch norm
        dims = [0, *range(2, x.dim())]
        mean, var = ghost_moments(x, mask, dims)
        if bn.track_running_stats and bn.running_mean is not None:
            self._update_running_stats(mean, var, n=x.numel() // x.shape[1])
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        """Same rule as ``BatchNorm``: momentum (or cumulative) average, Bessel-corrected variance."""
        bn: Any = self
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), momentum)


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` with ghost-sample statistics for inputs ``(N, C)`` or ``(N, C, L)``."""


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """``BatchNorm2d`` with ghost-sample statistics for images ``(N, C, H, W)``."""


class GhostBatchNormNodes(_GhostMixin, nn.BatchNorm1d):
    """``BatchNorm1d`` over node features of a graph batch: the ghost nodes are the nodes of ghost graphs.

    Its mask is per node (``batch.ghost[batch.batch]``), set by :func:`set_ghost_mask`
    from a PyG ``Batch``; G counts ghost nodes and the real graphs' nodes weigh 1 in total.
    """

    node_ghost_mask: Tensor | None = None
    _mask_attr = "node_ghost_mask"


def set_ghost_mask(model: nn.Module, batch: Any) -> None:
    """Tell every ghost batch norm in ``model`` which rows of the coming forward pass are ghosts.

    ``batch`` is a batch (a mapping with ``ghost``, or a PyG ``Batch`` with a
    per-graph ``ghost``), a bool mask over rows, or ``None`` to clear the masks
    (ordinary batch norm).
    """
    rows, nodes = ghost_masks(batch)
    for module in model.modules():
        if isinstance(module, GhostBatchNormNodes):
            module.node_ghost_mask = nodes
        elif isinstance(module, _GhostMixin):
            module.ghost_mask = rows


def ghost_masks(batch: Any) -> tuple[Tensor | None, Tensor | None]:
    """The per-row (per-graph) and per-node ghost masks of a batch; ``None`` where it has none."""
    if batch is None or isinstance(batch, Tensor):
        return batch, None
    ghost = batch.get("ghost") if isinstance(batch, Mapping) else getattr(batch, "ghost", None)
    if ghost is None:
        return None, None
    ghost = torch.as_tensor(ghost, dtype=torch.bool).reshape(-1)
    graph_of_node = None if isinstance(batch, Mapping) else getattr(batch, "batch", None)
    nodes = ghost[graph_of_node] if isinstance(graph_of_node, Tensor) else None
    return ghost, nodes


def convert_batchnorm(model: nn.Module, nodes: str | Sequence[str] | None = None) -> nn.Module:
    """Turn the model's ``BatchNorm1d/2d`` layers into ghost batch norms, in place.

    Parameters, running statistics, device and hooks are kept (the modules
    change class, not state). ``nodes`` names (or glob patterns) the batch norms
    that normalize node features of graph batches; they become
    :class:`GhostBatchNormNodes`. Returns ``model``.
    """
    patterns = [nodes] if isinstance(nodes, str) else list(nodes or [])
    matched: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _GhostMixin) or type(module) not in (nn.BatchNorm1d, nn.BatchNorm2d):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            if type(module) is not nn.BatchNorm1d:
                raise ValueError(f"{name} is a {type(module).__name__}; node features need a BatchNorm1d.")
            module.__class__ = GhostBatchNormNodes
            matched.add(name)
        else:
            module.__class__ = GhostBatchNorm1d if type(module) is nn.BatchNorm1d else GhostBatchNorm2d
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matched):
            raise ValueError(f"No BatchNorm1d of {type(model).__name__} matches nodes={pattern!r}.")
    return model


__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNormNodes",
    "convert_batchnorm",
    "ghost_masks",
    "set_ghost_mask",
]
