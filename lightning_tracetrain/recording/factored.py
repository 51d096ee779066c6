"""Per-example factors of Linear layers under plain SGD (``TraceCallback(storage="factored")``).

With plain SGD (no momentum, no weight decay, no clipping) a Linear layer's step is exactly
``D_t = sum_r (-lr g_r) a_r^T`` over its input rows ``a_r`` and the loss gradients ``g_r`` of its
output rows (docs/method.md, "Per-example factors"). Storing ``a_r`` and ``-lr g_r`` instead of
``D_t`` is exact, smaller when a step has few rows, and splits every step over its examples
exactly, mixed batches included. :class:`FactoredSteps` captures both during training, chooses
the layers where that pays at the first step, and checks the first step of every fit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

_FIX = "or trace with storage='lossless' (exact for any optimizer)"


class FactorCapture:
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


class FactoredSteps:
    """``storage="factored"``: each step's factors of the factored layers, chosen and checked at the first step.

    Args:
        layers: Candidate layers (``torch.nn.Linear`` updated by an optimizer), by name.
        groups: The optimizer parameter group of each candidate's weight (its ``lr`` scales the factors).
        chosen: The layers a resumed trace already stores as factors (None: choose at the first step).
    """

    def __init__(
        self, layers: Mapping[str, nn.Linear], groups: Mapping[str, dict[str, Any]], chosen: Sequence[str] | None
    ) -> None:
        candidates = dict(layers) if chosen is None else {n: m for n, m in layers.items() if n in chosen}
        self._shapes = {name: tuple(m.weight.shape) for name, m in candidates.items()}
        self._groups = {name: groups[name] for name in candidates}
        self._capture = FactorCapture(candidates)
        self.chosen: tuple[str, ...] | None = None if chosen is None else tuple(chosen)
        self._checked = False

    def take(self, rows: int, step: int) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's factors of the chosen layers; on the first step of a new trace, choose those layers.

        A layer is chosen when its step factors (2-D input, one row per example) and its factors are
        smaller than its weight: ``rows * (in + out) < in * out``.
        """
        got = {name: step_factors(self._capture.take(name), float(g["lr"]), rows) for name, g in self._groups.items()}
        if self.chosen is None:
            self.chosen = tuple(name for name, f in got.items() if self._worth_it(name, f, rows))
        out = {}
        for name in self.chosen:
            f = got[name]
            if isinstance(f, str):
                raise RuntimeError(
                    f"TraceCallback(storage='factored') cannot record step {step} of {name}: {f}. "
                    "Its earlier steps are committed; trace this model with storage='lossless'."
                )
            out[name] = f
        return out

    def _worth_it(self, name: str, factors: tuple[Tensor, Tensor] | str, rows: int) -> bool:
        out_f, in_f = self._shapes[name]
        if isinstance(factors, str):
            log.info("TraceCallback: %s is stored as dense deltas: %s.", name, factors)
            return False
        if rows * (in_f + out_f) >= in_f * out_f:
            log.info(
                "TraceCallback: %s is stored as dense deltas: its factors, %d rows x (%d + %d) values per step, "
                "would be larger than %d x %d.", name, rows, in_f, out_f, out_f, in_f,
            )  # fmt: skip
            return False
        return True

    def check(self, factors: Mapping[str, tuple[Tensor, Tensor]], actual: Mapping[tuple[str, str], Tensor]) -> bool:
        """On the first step of a fit: the factors must rebuild the actual change. True the first time only."""
        if self._checked:
            return False
        for name, (a, g) in factors.items():
            check_step(name, a, g, actual[(name, "weight")], actual.get((name, "bias")))
        self._capture.keep_only(set(self.chosen or ()))
        self._groups = {name: self._groups[name] for name in self.chosen or ()}
        self._checked = True
        return True

    def remove(self) -> None:
        self._capture.remove()


def to_numpy(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (a.cpu().numpy(), g.cpu().numpy()) for name, (a, g) in factors.items()}


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


def param_group(
    optimizers: Sequence[torch.optim.Optimizer], weight: Tensor
) -> tuple[torch.optim.Optimizer, dict[str, Any]] | None:
    """The optimizer and parameter group that update ``weight`` (None when no optimizer does)."""
    for opt in optimizers:
        for group in opt.param_groups:
            if any(p is weight for p in group["params"]):
                return opt, group
    return None


def check_plain_sgd(
    layers: Mapping[str, nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    world_size: int,
    precision: str,
    gradient_clip_val: float | None,
) -> None:
    """Raise a clear error when the run's steps are not exactly ``-lr`` times the layers' gradients."""
    if world_size > 1:
        raise NotImplementedError(
            f"storage='factored' records one process's examples; under {world_size} processes use storage='lossless'."
        )
    if str(precision) not in ("32-true", "64-true", "32", "64"):
        raise ValueError(
            f"storage='factored' needs full precision (the gradients of precision={precision!r} are scaled "
            f"or rounded before the step): train with precision='32-true', {_FIX}."
        )
    if gradient_clip_val:
        raise ValueError(
            f"storage='factored' needs unclipped gradients, but gradient_clip_val={gradient_clip_val}: "
            f"drop the clipping, {_FIX}."
        )
    for name, module in layers.items():
        found = param_group(optimizers, module.weight)
        if found is None:
            continue
        opt, group = found
        extras = {k: group.get(k) for k in ("momentum", "weight_decay", "nesterov", "maximize") if group.get(k)}
        if not isinstance(opt, torch.optim.SGD) or extras:
            setting = ", ".join(f"{k}={v}" for k, v in extras.items())
            raise ValueError(
                f"storage='factored' needs plain SGD, but {name}.weight is updated by {type(opt).__name__}"
                f"({setting}), whose steps are not -lr times the current gradient. Use torch.optim.SGD with "
                f"momentum=0 and weight_decay=0, {_FIX}."
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
