"""A small CNN classifier for 8x8 digit images."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_tracetrain.workloads.models.classifier import Classifier


class DigitsCNN(Classifier):
    """Two 3x3 convolutions, max pooling and two fully connected layers.

    Traced layers (qualified names): ``net.conv1``, ``net.conv2``, ``net.fc1`` and
    ``net.fc2`` (the logits). With ``batch_norm=True`` a batch norm follows each
    of the first three (``net.bn1..3``); turn them into ghost batch norms with
    :func:`~lightning_tracetrain.convert_batchnorm` or ``ghost_batch_norm=True``.

    Args:
        channels: Channels of the first convolution (the second has twice as many).
        hidden: Width of the hidden fully connected layer.
        num_classes: Number of classes.
        lr: Learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty of the optimizer.
        batch_norm: Add batch norm after conv1, conv2 and fc1.
        ghost_batch_norm: Make those ghost batch norms (for single-class batches with ghosts).
        schedule: ``"constant"`` learning rate, or ``"cosine"`` decay to zero over the run
            (single-class batches need it: a model otherwise leans towards the classes of its last steps).
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
        batch_norm: bool = False,
        ghost_batch_norm: bool = False,
        schedule: Literal["constant", "cosine"] = "constant",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels

        def norm(kind: type[nn.Module], n: int) -> nn.Module:
            return kind(n) if batch_norm or ghost_batch_norm else nn.Identity()

        self.net = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, c, 3, padding=1),
                bn1=norm(nn.BatchNorm2d, c),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(c, 2 * c, 3, padding=1),
                bn2=norm(nn.BatchNorm2d, 2 * c),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(2 * c * 16, hidden),
                bn3=norm(nn.BatchNorm1d, hidden),
                relu3=nn.ReLU(),
                fc2=nn.Linear(hidden, num_classes),
            )
        )
        if ghost_batch_norm:
            from lightning_tracetrain.singleclass.ghost import convert_batchnorm

            convert_batchnorm(self.net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            raise ValueError(f"Unknown optimizer {hp.optimizer!r}: use 'sgd' or 'adam'.")
        if hp.schedule == "constant":
            return opt
        if hp.schedule != "cosine":
            raise ValueError(f"Unknown schedule {hp.schedule!r}: use 'constant' or 'cosine'.")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        decay = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}
