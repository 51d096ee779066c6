"""TracIn (Garima et al., NeurIPS 2020) from intermediate weights rebuilt from the trace.

TracInCP scores a training example ``z`` for a test input ``t`` as
``sum_k eta_k <grad l(z; w_k), grad l(t; w_k)>`` over checkpoints ``w_k``. Here
the checkpoints are the traced layers' weights at every epoch end,
``trace.weights_at(k)``, so no extra checkpoint files are needed; gradients are
taken per traced layer. Untraced parameters (batch-norm affine weights and
running statistics) keep their final values: an approximation for models with
batch norm. The test input's loss uses the model's predicted class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_tracetrain.batch import batch_inputs
from lightning_tracetrain.trace import Trace


def epoch_checkpoints(trace: Trace) -> list[int]:
    """Step counts at the end of every epoch (checkpoint ``k`` holds the weights after ``k`` steps)."""
    epochs = trace.steps.epoch
    ends = np.flatnonzero(np.diff(epochs)) + 1
    return [*ends.tolist(), trace.num_steps]


class TracIn:
    """TracInCP per traced layer, with checkpoints rebuilt from a trace.

    Args:
        model: The trained model (its final weights; used in eval mode).
        trace: The trace of its training.
        layers: Traced layers to score (default: all).
        checkpoints: Step counts of the checkpoints (default: every epoch end).
    """

    def __init__(
        self,
        model: nn.Module,
        trace: Trace | str,
        layers: Sequence[str] | None = None,
        checkpoints: Sequence[int] | None = None,
    ) -> None:
        self.trace = trace if isinstance(trace, Trace) else Trace(trace)
        self.layers = list(layers or self.trace.layers)
        for name in self.layers:
            self.trace.layer(name)
        self.model = copy.deepcopy(model).eval()
        self.checkpoints = list(checkpoints or epoch_checkpoints(self.trace))
        lr = self.trace.steps.lr[:, 0]
        self.lrs = [float(lr[k - 1]) for k in self.checkpoints]

    def _load(self, step: int) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for layer, params in self.trace.weights_at(step).items():
                for name, value in params.items():
                    getattr(modules[layer], name).copy_(value)

    def _gradients(self, batches: Iterable[Any], targets: str) -> dict[str, Tensor]:
        """Per-example loss gradients w.r.t. each layer's parameters, flattened: ``{layer: (n, P)}``."""
        device = next(self.model.parameters()).device
        names = [f"{layer}.{p}" for layer in self.layers for p in self.trace.layer(layer).params]
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}

        def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(torch.func.functional_call(self.model, p, (x[None],)), y[None])

        per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
        grads: dict[str, list[Tensor]] = {layer: [] for layer in self.layers}
        for batch in batches:
            batch = move_data_to_device(batch, device)
            x = batch_inputs(batch)
            if not isinstance(x, Tensor):
                raise NotImplementedError("TracIn here needs tensor inputs (per-example gradients by vmap).")
            with torch.no_grad():
                y = self.model(x).argmax(-1) if targets == "predicted" else batch["y"].reshape(-1)
            g = per_example(params, x, y)
            for layer in self.layers:
                parts = [g[f"{layer}.{p}"].reshape(len(y), -1) for p in self.trace.layer(layer).params]
                grads[layer].append(torch.cat(parts, 1).double())
        return {layer: torch.cat(parts) for layer, parts in grads.items()}

    def scores(
        self, train_batches: Sequence[Any], test_batches: Sequence[Any], cosine: bool = False
    ) -> dict[str, Tensor]:
        """``{layer: (Q, n)}`` TracInCP scores (gradient dot products, or cosines with ``cosine=True``)."""
        out: dict[str, Tensor] = {}
        for step, lr in zip(self.checkpoints, self.lrs, strict=True):
            self._load(step)
            g_train = self._gradients(train_batches, "y")
            g_test = self._gradients(test_batches, "predicted")
            for layer in self.layers:
                a, b = g_test[layer], g_train[layer]
                if cosine:
                    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
                out[layer] = out.get(layer, 0) + lr * (a @ b.T)
        self._load(self.trace.num_steps)
        return out

    def self_influence(self, train_batches: Sequence[Any]) -> dict[str, Tensor]:
        """``{layer: (n,)}``: ``sum_k eta_k ||grad l(z_i; w_k)||^2``, TracIn's score for mislabel detection."""
        out: dict[str, Tensor] = {}
        for step, lr in zip(self.checkpoints, self.lrs, strict=True):
            self._load(step)
            for layer, g in self._gradients(train_batches, "y").items():
                out[layer] = out.get(layer, 0) + lr * g.pow(2).sum(1)
        self._load(self.trace.num_steps)
        return out
