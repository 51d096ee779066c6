"""A DDP run (gloo, CPU) on single-class batches, for the sampler's DDP test.

Usage: python tests/single_class_run.py OUT --devices 2

Each rank writes OUT/rank{r}.json: per step, the class and the real and ghost
ids it trained on. Rank 0 also records a trace at OUT/trace and saves the final
weights to OUT/final.pt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_tracetrain import TraceCallback
from lightning_tracetrain.functional import real_cross_entropy
from lightning_tracetrain.singleclass import GhostBatchNorm1d, SingleClassBatchesMixin
from lightning_tracetrain.trainer import quiet_trainer


class Blobs(SingleClassBatchesMixin, pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.tensor([0] * 30 + [1] * 17 + [2] * 5)
        self.train_set = TensorDataset(torch.randn(len(y), 4, generator=g) + y[:, None], y)

    def train_dataloader(self) -> Any:
        return self.single_class_dataloader(self.train_set, batch_size=4, ghost_size=3, seed=7)


class Net(pl.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = nn.Sequential(nn.Linear(4, 8), GhostBatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ghost = batch["ghost"]
        self.seen.append(
            {
                "classes": sorted(set(batch["y"][~ghost].tolist())),
                "real": batch["index"][~ghost].tolist(),
                "ghost": batch["index"][ghost].tolist(),
                "real_first": bool((~ghost).sum() == 0 or not ghost[: int((~ghost).sum())].any()),
            }
        )
        return real_cross_entropy(self.net(batch["x"]), batch["y"], ghost)

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=2,
        callbacks=[TraceCallback(args.out / "trace")],
    )
    model = Net(str(args.out))
    trainer.fit(model, Blobs())
    if trainer.is_global_zero:  # the weights the trace must add up to
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, args.out / "final.pt")


if __name__ == "__main__":
    main()
