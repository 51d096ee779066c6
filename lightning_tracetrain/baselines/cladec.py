"""ClaDec (Schneider & Vlachos, "Explaining Neural Networks by Decoding Layer Activations").

A decoder learns to map a chosen layer's activations of a *frozen* classifier
back to the input. Its reconstructions show what the layer keeps; a reference
autoencoder with the same architecture, trained end to end for reconstruction
only, shows what a layer of that size *could* keep. The extended ClaDec loss
trades fidelity for the classifier's view:
``(1 - alpha) * MSE(x_hat, x) + alpha * CE(classifier(x_hat), y)``, with the
classifier in eval mode (its batch-norm statistics are never updated).

The "activations" are the chosen module's output, for the traced layers the
pre-activation the Explainer explains. The decoder is an MLP (enough for small
images such as digits; pass your own ``decoder`` for larger inputs).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tracetrain.batch import batch_field, batch_inputs, is_graph_item
from lightning_tracetrain.trainer import quiet_trainer


class _Stop(Exception):
    """Raised by the capture hook: the layers after the chosen one are not needed."""


def encode(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """The output of ``layer`` (a submodule of ``model``) for input ``x``; the rest of the forward is skipped."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, out: Tensor) -> None:
        captured.append(out)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"The layer {type(layer).__name__} was not called by {type(model).__name__}.forward.")
    return captured[0]


def mlp_decoder(in_features: int, shape: Sequence[int], hidden: int = 256) -> nn.Module:
    """Flattened activations -> two hidden ReLU layers -> an input of ``shape``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, math.prod(shape)),
        nn.Unflatten(1, tuple(shape)),
    )


def reset_parameters(model: nn.Module) -> nn.Module:
    """Re-initialize every submodule that can (a fresh encoder of the classifier's architecture)."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


class ClaDec(pl.LightningModule):
    """A decoder from ``layer``'s activations of a frozen classifier to the input.

    Args:
        classifier: The trained classifier to explain (a frozen copy in eval mode is used).
        layer: Qualified name of the layer whose output is decoded, e.g. ``"net.fc1"``.
        input_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        alpha: Weight of the classification loss (0: pure reconstruction, the basic ClaDec).
        reference: Build the reference autoencoder instead: a freshly initialized copy of the
            classifier up to ``layer`` is trained with the decoder, for reconstruction only.
        lr: Adam learning rate.
        hidden: Width of the default MLP decoder.
        decoder: A decoder of your own (maps the layer output to an input).

    Example:
        >>> cladec = ClaDec(model, "net.fc1", (1, 8, 8), alpha=0.1)  # doctest: +SKIP
        >>> pl.Trainer(max_epochs=30).fit(cladec, train_loader)  # doctest: +SKIP
        >>> images = cladec.reconstruct(test_batch["x"])  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier: nn.Module,
        layer: str,
        input_shape: Sequence[int],
        alpha: float = 0.0,
        reference: bool = False,
        lr: float = 1e-3,
        hidden: int = 256,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if reference and alpha:
            raise ValueError("The reference autoencoder is trained for reconstruction only: use alpha=0.")
        modules = dict(classifier.named_modules())
        if layer not in modules:
            names = [n for n, m in classifier.named_modules() if n and not list(m.children())]
            raise ValueError(f"{type(classifier).__name__} has no layer {layer!r}; its layers: {', '.join(names)}.")
        self.layer_name, self.input_shape, self.alpha, self.reference, self.lr = (
            layer, tuple(input_shape), alpha, reference, lr,
        )  # fmt: skip
        self.classifier = copy.deepcopy(classifier).eval().requires_grad_(False)  # the caller's model is untouched
        self.encoder = reset_parameters(copy.deepcopy(classifier)).requires_grad_(True) if reference else None
        with torch.no_grad():
            sample = self.activations(torch.zeros(2, *self.input_shape))
        self.decoder = decoder if decoder is not None else mlp_decoder(sample[0].numel(), self.input_shape, hidden)

    def train(self, mode: bool = True) -> ClaDec:
        """Lightning turns the module to training mode; the classifier stays in eval mode (frozen statistics)."""
        super().train(mode)
        self.classifier.eval()
        return self

    def activations(self, x: Tensor) -> Tensor:
        """The chosen layer's output: of the frozen classifier, or of the trained encoder (reference)."""
        model = self.encoder if self.encoder is not None else self.classifier
        return encode(model, dict(model.named_modules())[self.layer_name], x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.activations(x))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstructions of ``x`` in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self(x.to(self.device))
        finally:
            self.train(was_training)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, y = batch["x"], batch["y"].reshape(-1)
        x_hat = self(x)
        loss = (1 - self.alpha) * F.mse_loss(x_hat, x)
        if self.alpha:
            loss = loss + self.alpha * F.cross_entropy(self.classifier(x_hat), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.decoder.parameters()) + (list(self.encoder.parameters()) if self.encoder else [])
        return torch.optim.Adam(params, lr=self.lr)


@torch.no_grad()
def reconstruct_all(cladec: ClaDec, batches: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Reconstructions and labels of every batch, on the CPU."""
    xs, ys = [], []
    for batch in batches:
        batch = move_data_to_device(batch, cladec.device)
        xs.append(cladec.reconstruct(batch_inputs(batch)).cpu())
        ys.append(batch["y"].reshape(-1).cpu())
    return torch.cat(xs), torch.cat(ys)


def fit_decoders(
    model: nn.Module,
    layer: str,
    dataset: Any,
    alphas: Sequence[float] = (0.0,),
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, ClaDec]:
    """ClaDec for each ``alpha`` and the reference autoencoder, trained on ``dataset`` (batch protocol).

    Keys: ``"ClaDec alpha=A"`` and ``"reference autoencoder"``.
    """
    item = dataset[0]
    x = None if is_graph_item(item) else batch_field(item, "x")
    if not isinstance(x, Tensor):
        raise ValueError("ClaDec decodes to tensor inputs such as images; this dataset's inputs are not tensors.")
    decoders = {f"ClaDec alpha={a:g}": ClaDec(model, layer, x.shape, alpha=a) for a in alphas}
    decoders["reference autoencoder"] = ClaDec(model, layer, x.shape, reference=True)
    for cladec in decoders.values():
        pl.seed_everything(seed, verbose=False)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        trainer = quiet_trainer(max_epochs=epochs)
        with warnings.catch_warnings():  # the frozen classifier is in eval mode on purpose
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            trainer.fit(cladec, loader)
    return decoders
