"""A small CNN classifier for 8x8 digit images."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsCNN(pl.LightningModule):
    """Two 3x3 convolutions, max pooling and two fully connected layers.

    Traced layers (qualified names): ``net.0``, ``net.2`` (convolutions),
    ``net.6``, ``net.8`` (fully connected; ``net.8`` outputs the logits).

    Args:
        channels: Channels of the first convolution (the second has twice as many).
        hidden: Width of the hidden fully connected layer.
        num_classes: Number of classes.
        lr: Learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty of the optimizer.
    """

    def __init__(
        self,
        channels: int = 16,
        hidden: int = 64,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["y"]))
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        logits = self(batch["x"])
        acc = (logits.argmax(-1) == batch["y"]).float().mean()
        self.log(f"{stage}_loss", F.cross_entropy(logits, batch["y"]), batch_size=len(batch["y"]))
        self.log(f"{stage}_acc", acc, prog_bar=True, batch_size=len(batch["y"]))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        raise ValueError(f"Unknown optimizer {hp.optimizer!r}: use 'sgd' or 'adam'.")
