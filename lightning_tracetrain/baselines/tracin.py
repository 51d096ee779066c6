"""TracIn (Garima et al., NeurIPS 2020) from intermediate weights rebuilt from the trace.

TracInCP scores a training example ``z`` for a test input ``t`` as
``sum_k eta_k <grad l(z; w_k), grad l(t; w_k)>`` over checkpoints ``w_k``. Here
the checkpoints are the traced layers' weights at every epoch end,
``trace.weights_at(k)``, so no extra checkpoint files are needed; gradients are
taken per traced layer. Untraced parameters (batch-norm affine weights and
running statistics) keep their final values: an approximation for models with
batch norm.

As in TracInCP, checkpoint ``w_k`` stands for the steps since the previous
checkpoint, so its weight ``eta_k`` is the sum of their learning rates (the
first param group's, ``trace.steps.lr[:, 0]``): the checkpoints' estimate of
the ideal ``sum_t eta_t <grad l(z; w_t), grad l(t; w_t)>`` over every step. The
test input's loss is taken for one class at every checkpoint: the final
model's prediction (default) or the test label.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_tracetrain.batch import batch_field, batch_inputs
from lightning_tracetrain.trace import Trace


def epoch_checkpoints(trace: Trace) -> list[int]:
    """Step counts at the end of every epoch (checkpoint ``k`` holds the weights after ``k`` steps)."""
    epochs = trace.steps.epoch
    ends = np.flatnonzero(np.diff(epochs)) + 1
    return [*ends.tolist(), trace.num_steps]


def checkpoint_weights(lr: np.ndarray, checkpoints: Sequence[int]) -> list[float]:
    """``eta_k``: the learning rates summed over the steps each checkpoint stands for, ``(previous, k]``."""
    bounds = [0, *checkpoints]
    return [float(lr[a:b].sum()) for a, b in itertools.pairwise(bounds)]


class TracIn:
    """TracInCP per traced layer, with checkpoints rebuilt from a trace.

    Args:
        model: The trained model (its final weights; used in eval mode).
        trace: The trace of its training.
        layers: Traced layers to score (default: all).
        checkpoints: Step counts of the checkpoints (default: every epoch end), increasing.
        test_targets: The class whose loss a test input's gradient is taken of, the same at every
            checkpoint: ``"predicted"`` (the final model's prediction, TracIn's usual choice) or
            ``"labels"`` (the test batch's ``y``).
    """

    def __init__(
        self,
        model: nn.Module,
        trace: Trace | str,
        layers: Sequence[str] | None = None,
        checkpoints: Sequence[int] | None = None,
        test_targets: Literal["predicted", "labels"] = "predicted",
    ) -> None:
        if test_targets not in ("predicted", "labels"):
            raise ValueError(f"test_targets must be 'predicted' or 'labels', got {test_targets!r}.")
        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        self.layers = list(layers or self.trace.layers)
        for name in self.layers:
            self.trace.layer(name)
        self.model = copy.deepcopy(model).eval()
        self.test_targets = test_targets
        self.checkpoints = list(checkpoints or epoch_checkpoints(self.trace))
        if self.checkpoints != sorted(set(self.checkpoints)) or not 0 < self.checkpoints[0] <= self.trace.num_steps:
            raise ValueError(
                f"checkpoints must be increasing step counts in 1..{self.trace.num_steps}, got {self.checkpoints}."
            )
        self.lrs = checkpoint_weights(self.trace.steps.lr[:, 0], self.checkpoints)

    def _load(self, step: int) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for layer, params in self.trace.weights_at(step).items():
                for name, value in params.items():
                    getattr(modules[layer], name).copy_(value)

    def _targets(self, batches: Iterable[Any], kind: str) -> list[Tensor]:
        """Each batch's target classes: its labels, or the current model's predictions."""
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for batch in batches:
                batch = move_data_to_device(batch, device)
                y = batch_field(batch, "y")
                if kind == "predicted":
                    out.append(self.model(batch_inputs(batch)).argmax(-1))
                elif y is None:
                    raise ValueError("test_targets='labels' needs test batches with labels (the batch protocol's 'y').")
                else:
                    out.append(y.reshape(-1))
        return out

    def _gradients(self, batches: Iterable[Any], targets: list[Tensor]) -> dict[str, Tensor]:
        """Per-example loss gradients w.r.t. each layer's parameters, flattened: ``{layer: (n, P)}``."""
        device = next(self.model.parameters()).device
        names = [f"{layer}.{p}" for layer in self.layers for p in self.trace.layer(layer).params]
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}

        def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(torch.func.functional_call(self.model, p, (x[None],)), y[None])

        per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
        grads: dict[str, list[Tensor]] = {layer: [] for layer in self.layers}
        for batch, y in zip(batches, targets, strict=True):
            x = batch_inputs(move_data_to_device(batch, device))
            if not isinstance(x, Tensor):
                raise NotImplementedError("TracIn here needs tensor inputs (per-example gradients by vmap).")
            g = per_example(params, x, y.to(device))
            for layer in self.layers:
                parts = [g[f"{layer}.{p}"].reshape(len(y), -1) for p in self.trace.layer(layer).params]
                grads[layer].append(torch.cat(parts, 1).detach().double())
        return {layer: torch.cat(parts) for layer, parts in grads.items()}

    def scores(
        self, train_batches: Sequence[Any], test_batches: Sequence[Any], cosine: bool = False
    ) -> dict[str, Tensor]:
        """``{layer: (Q, n)}`` TracInCP scores (gradient dot products, or cosines with ``cosine=True``)."""
        train_targets = self._targets(train_batches, "labels")
        test_targets = self._targets(test_batches, self.test_targets)  # with the final weights
        out: dict[str, Tensor] = {}
        for step, lr in zip(self.checkpoints, self.lrs, strict=True):
            self._load(step)
            g_train = self._gradients(train_batches, train_targets)
            g_test = self._gradients(test_batches, test_targets)
            for layer in self.layers:
                a, b = g_test[layer], g_train[layer]
                if cosine:
                    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
                out[layer] = out.get(layer, 0) + lr * (a @ b.T)
        self._load(self.trace.num_steps)
        return out

    def self_influence(self, train_batches: Sequence[Any]) -> dict[str, Tensor]:
        """``{layer: (n,)}``: ``sum_k eta_k ||grad l(z_i; w_k)||^2``, TracIn's score for mislabel detection."""
        targets = self._targets(train_batches, "labels")
        out: dict[str, Tensor] = {}
        for step, lr in zip(self.checkpoints, self.lrs, strict=True):
            self._load(step)
            for layer, g in self._gradients(train_batches, targets).items():
                out[layer] = out.get(layer, 0) + lr * g.pow(2).sum(1)
        self._load(self.trace.num_steps)
        return out
