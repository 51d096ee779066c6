"""VGG-16 for CIFAR-10, the paper's image workload: 13 conv + 3 fully connected layers (about 15.2M parameters)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_tracetrain.singleclass.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from lightning_tracetrain.workloads.models.classifier import Classifier

_CONFIG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(Classifier):
    """VGG-16 with (ghost) batch norm after every layer but the last; plain SGD with a step schedule.

    Traced layers: ``features.0``, ``features.3``, ... (13 convolutions) and
    ``classifier.0``, ``classifier.3``, ``classifier.6`` (512-512-10).

    Args:
        num_classes: Output classes.
        lr: Initial learning rate (the paper: 0.01).
        momentum: SGD momentum (the paper: plain SGD, 0).
        lr_milestones: Epochs at which the learning rate is divided by 10 (the paper: every 10 epochs).
        ghost_batch_norm: Ghost batch norm (for single-class batches) instead of plain batch norm.
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.0,
        lr_milestones: list[int] | None = None,
        ghost_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        bn2d, bn1d = (GhostBatchNorm2d, GhostBatchNorm1d) if ghost_batch_norm else (nn.BatchNorm2d, nn.BatchNorm1d)
        layers: list[nn.Module] = []
        channels = 3
        for item in _CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), bn2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), bn1d(512), nn.ReLU(inplace=True),
            nn.Linear(512, 512), bn1d(512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        return self.step_schedule(opt, list(hp.lr_milestones or [10, 20, 30]))
