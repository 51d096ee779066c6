"""Representer Point Selection (Yeh et al., NeurIPS 2018) on a model's last Linear layer.

The last layer is fine-tuned, in float64 to a tight gradient tolerance, towards
the model's own softmax outputs with an L2 penalty ``lambda ||W||^2``. At that
stationary point ``W = sum_i alpha_i f_i^T`` with
``alpha_i = (softmax_i - targets_i) / (-2 lambda n)``, so the fine-tuned logits
of any input ``t`` are exactly ``sum_i alpha_i <f_i, f_t>`` (the representer
values). The bias is handled as a weight on a constant feature 1, as in the
authors' fine-tuning code.

Two conventions for the values: ``"logits"`` (default) keeps the constant
feature in the kernel, ``alpha_ic (<f_i, f_t> + 1)``, so the values of all
training examples add up to the fine-tuned logit of class ``c``; ``"authors"``
uses the raw features, ``alpha_ic <f_i, f_t>``, as the authors' notebooks do.
Both share ``alpha`` and so the self-influence ``|alpha_i,y_i|``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_tracetrain.batch import batch_field, batch_inputs


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` in module order (the logit layer)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer for Representer Points.")
    return linears[-1]


@torch.no_grad()
def layer_features(model: nn.Module, layer: nn.Module, batches: Iterable[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The layer's inputs with a constant 1 appended (float64), the model's logits and the batches' labels
    (-1 where a batch has none), over all batches."""
    device = next(model.parameters()).device
    feats: list[Tensor] = []
    hook = layer.register_forward_hook(lambda m, args, out: feats.append(args[0].detach().double()))
    logits, labels = [], []
    try:
        model.eval()
        for batch in batches:
            batch = move_data_to_device(batch, device)
            logits.append(model(batch_inputs(batch)).double())
            y = batch_field(batch, "y")
            labels.append(y.reshape(-1) if y is not None else torch.full((len(logits[-1]),), -1, device=device))
    finally:
        hook.remove()
    f = torch.cat(feats)
    ones = torch.ones(len(f), 1, dtype=f.dtype, device=f.device)
    return torch.cat([f, ones], 1), torch.cat(logits), torch.cat(labels)


def fit_last_layer(
    features: Tensor, targets: Tensor, lam: float, init: Tensor | None = None, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Minimize ``mean CE(softmax(F W^T), targets) + lam ||W||^2`` by L-BFGS; returns ``W`` and ``alpha``."""
    n = features.shape[0]
    w = (init.clone() if init is not None else torch.zeros(targets.shape[1], features.shape[1])).double()
    w.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=5000, tolerance_grad=tol, tolerance_change=1e-16, history_size=50,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        logp = torch.log_softmax(features @ w.T, -1)
        loss = -(targets * logp).sum(1).mean() + lam * w.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(20):  # L-BFGS stops at max_iter or a tolerance; restart until the gradient is tiny
        opt.step(closure)
        if w.grad is not None and float(w.grad.abs().max()) < tol:
            break
    w = w.detach()
    alpha = (torch.softmax(features @ w.T, -1) - targets) / (-2.0 * lam * n)
    return w, alpha


@dataclass
class RepresenterPoints:
    """Representer values of every training example for test inputs.

    Args:
        model: The trained classifier (eval mode is used).
        lam: L2 penalty of the fine-tuning (Yeh et al.: 0.003).
        targets: ``"predicted"``: fine-tune towards the model's own softmax outputs (explains the model's
            predictions); ``"labels"``: towards the training labels (the loss the model was trained with;
            Yeh et al.'s dataset debugging, where ``|alpha_i,y_i|`` ranks suspicious labels).
        convention: ``"logits"``: values ``alpha_ic (<f_i, f_t> + 1)``, which add up to the fine-tuned logits;
            ``"authors"``: ``alpha_ic <f_i, f_t>`` on the raw features, as in Yeh et al.'s notebooks.

    Example:
        >>> rp = RepresenterPoints(model).fit(train_loader)  # doctest: +SKIP
        >>> values = rp.values(test_batches)  # (queries, training examples), for the predicted class
    """

    model: nn.Module
    lam: float = 0.003
    targets: Literal["predicted", "labels"] = "predicted"
    convention: Literal["logits", "authors"] = "logits"

    def fit(self, train_batches: Iterable[Any]) -> RepresenterPoints:
        """Fine-tune the last layer on the training features (towards ``targets``)."""
        if self.targets not in ("predicted", "labels"):
            raise ValueError(f"targets must be 'predicted' or 'labels', got {self.targets!r}.")
        if self.convention not in ("logits", "authors"):
            raise ValueError(f"convention must be 'logits' or 'authors', got {self.convention!r}.")
        self.layer_name, layer = last_linear(self.model)
        self.features, logits, self.labels = layer_features(self.model, layer, train_batches)
        if self.targets == "labels":
            if bool((self.labels < 0).any()):
                raise ValueError("targets='labels' needs training batches with labels (the batch protocol's 'y').")
            target = torch.nn.functional.one_hot(self.labels, logits.shape[1]).double()
        else:
            target = torch.softmax(logits, -1)
        init = torch.cat([layer.weight.detach(), _bias(layer)[:, None]], 1).double().to(self.features.device)
        self.weight, self.alpha = fit_last_layer(self.features, target, self.lam, init)
        return self

    def self_influence(self) -> Tensor:
        """``|alpha_i,y_i|`` per training example: Yeh et al.'s score for finding mislabeled examples."""
        return self.alpha.gather(1, self.labels[:, None]).squeeze(1).abs()

    def logits(self, test_batches: Iterable[Any]) -> tuple[Tensor, Tensor]:
        """Fine-tuned logits of test inputs, directly and as the representer sum (they agree)."""
        f_t, _, _ = layer_features(self.model, last_linear(self.model)[1], test_batches)
        return f_t @ self.weight.T, (f_t @ self.features.T) @ self.alpha

    def values(self, test_batches: Iterable[Any]) -> tuple[Tensor, Tensor]:
        """The representer values for each test input's predicted class ``c``, ``(Q, n)``, and the predictions.

        ``alpha_ic (<f_i, f_t> + 1)`` (``convention="logits"``) or ``alpha_ic <f_i, f_t>`` (``"authors"``).
        """
        f_t, logits, _ = layer_features(self.model, last_linear(self.model)[1], test_batches)
        predicted = logits.argmax(-1)
        raw = slice(None) if self.convention == "logits" else slice(None, -1)  # the last feature is the constant 1
        return (f_t[:, raw] @ self.features[:, raw].T) * self.alpha[:, predicted].T, predicted


def _bias(layer: nn.Linear) -> Tensor:
    return (
        layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features, device=layer.weight.device)
    )
