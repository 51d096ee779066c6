"""Per-example factors of Linear layers under plain SGD (``TraceCallback(storage="factored")``).

With plain SGD (no momentum, no weight decay, no clipping) a Linear layer's step is exactly
``D_t = sum_r (-lr g_r) a_r^T`` over its input rows ``a_r`` and the loss gradients ``g_r`` of its
output rows (DESIGN.md section 2). Storing ``a_r`` and ``-lr g_r`` instead of ``D_t`` is exact, smaller
when a step has few rows, and splits every step over its examples exactly, mixed batches included.
:class:`FactorRecorder` captures both during training; the functions here check that the run fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class FactorRecorder:
    """Captures the input rows and output gradients of Linear layers for every backward pass.

    A forward hook keeps the layer's input and puts a gradient hook on its output; the pair is
    kept when the gradient arrives, so forwards without a backward (validation, logging) leave
    nothing behind. :meth:`take` hands over and clears what one optimizer step saw.
    """

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self._rows: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
        self._handles: dict[str, RemovableHandle] = {
            name: module.register_forward_hook(self._hook(name)) for name, module in layers.items()
        }

    def _hook(self, name: str) -> Any:
        rows = self._rows[name]

        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if not (module.training and torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
                return
            x = args[0].detach()
            out.register_hook(lambda g: rows.append((x, g.detach())))

        return hook

    def take(self, name: str) -> list[tuple[Tensor, Tensor]]:
        """The (input, output gradient) pairs of layer ``name`` since the last call."""
        pairs = list(self._rows[name])
        self._rows[name].clear()
        return pairs

    def keep_only(self, names: set[str]) -> None:
        """Stop capturing every layer not in ``names``."""
        for name in [n for n in self._handles if n not in names]:
            self._handles.pop(name).remove()
            del self._rows[name]

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles, self._rows = {}, {}


def step_factors(pairs: list[tuple[Tensor, Tensor]], lr: float, rows: int) -> tuple[Tensor, Tensor] | str:
    """``(inputs, -lr * output gradients)`` of one step as float32 rows, or why they do not factor per example.

    They factor when every captured input is 2-D and the step has one row per example (``rows``).
    """
    if not pairs:
        return "it got no gradient in this step"
    if any(x.ndim != 2 for x, _ in pairs):
        shape = next(tuple(x.shape) for x, _ in pairs if x.ndim != 2)
        return f"its input has shape {shape}, not (examples, features)"
    inputs = torch.cat([x for x, _ in pairs]).float()
    if inputs.shape[0] != rows:
        return f"it saw {inputs.shape[0]} input rows for the {rows} examples of the step (is it called twice?)"
    outputs = torch.cat([g for _, g in pairs]).float().mul_(-lr)
    return inputs, outputs


def param_group(trainer: pl.Trainer, weight: Tensor) -> tuple[torch.optim.Optimizer, dict[str, Any]] | None:
    """The optimizer and parameter group that update ``weight`` (None when no optimizer does)."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            if any(p is weight for p in group["params"]):
                return opt, group
    return None


def check_plain_sgd(trainer: pl.Trainer, layers: Mapping[str, nn.Module]) -> None:
    """Raise a clear error when the run's steps are not exactly ``-lr`` times the layers' gradients."""
    fix = "or trace with storage='lossless' (exact for any optimizer)"
    if trainer.world_size > 1:
        raise NotImplementedError(
            f"storage='factored' records one process's examples; under {trainer.world_size} processes use "
            "storage='lossless'."
        )
    if str(trainer.precision) not in ("32-true", "64-true", "32", "64"):
        raise ValueError(
            f"storage='factored' needs full precision (the gradients of precision={trainer.precision!r} are scaled "
            f"or rounded before the step): train with precision='32-true', {fix}."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"storage='factored' needs unclipped gradients, but gradient_clip_val={trainer.gradient_clip_val}: "
            f"drop the clipping, {fix}."
        )
    for name, module in layers.items():
        found = param_group(trainer, module.weight)
        if found is None:
            continue
        opt, group = found
        extras = {k: group.get(k) for k in ("momentum", "weight_decay", "nesterov", "maximize") if group.get(k)}
        if not isinstance(opt, torch.optim.SGD) or extras:
            setting = ", ".join(f"{k}={v}" for k, v in extras.items())
            raise ValueError(
                f"storage='factored' needs plain SGD, but {name}.weight is updated by {type(opt).__name__}"
                f"({setting}), whose steps are not -lr times the current gradient. Use torch.optim.SGD with "
                f"momentum=0 and weight_decay=0, {fix}."
            )


def check_step(name: str, inputs: Tensor, outputs: Tensor, weight_delta: Tensor, bias_delta: Tensor | None) -> None:
    """The factors must rebuild the layer's actual weight (and bias) change of the step."""
    rebuilt = {"weight": outputs.T @ inputs}
    actual = {"weight": weight_delta}
    if bias_delta is not None:
        rebuilt["bias"], actual["bias"] = outputs.sum(0), bias_delta
    for param, value in rebuilt.items():
        scale = float(actual[param].abs().max())
        error = float((value.to(actual[param].device) - actual[param]).abs().max())
        if error > 1e-3 * scale + 1e-7:
            raise ValueError(
                f"The factors of {name}.{param} do not rebuild its change in the first step (max error {error:.3g} "
                f"on changes up to {scale:.3g}): something besides -lr times the loss gradient changed it (a loss "
                "term on the weights, hooks, a custom optimizer step, or weight and bias with different learning "
                "rates). Trace this run with storage='lossless'."
            )
