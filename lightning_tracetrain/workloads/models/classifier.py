"""The training, validation and test steps the paper's classifiers share."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tracetrain.batch import batch_field, batch_inputs
from lightning_tracetrain.functional import real_cross_entropy


class Classifier(pl.LightningModule):
    """Cross entropy over real rows (ghost rows only shape batch norm), accuracy on val/test.

    Batches follow the batch protocol: a mapping whose ``x`` goes to ``forward``,
    or a PyG ``Batch`` that goes to ``forward`` whole; ``y`` holds class ids.
    """

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        y = batch_field(batch, "y").reshape(-1)
        loss = real_cross_entropy(self(batch_inputs(batch)), y, batch_field(batch, "ghost"))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        y = batch_field(batch, "y").reshape(-1)
        logits = self(batch_inputs(batch))
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def step_schedule(
        self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1
    ) -> dict[str, Any]:
        """Divide the learning rate by ``1/gamma`` at the given epochs."""
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
