"""A traced training run in its own process, for the crash and resume tests.

Usage: python tests/trace_run.py OUT [--max-steps N] [--epochs E] [--sleep S] [--resume CKPT] [--devices D]
       [--trace URL] [--storage MODE] [--overwrite] [--hold FILE]

Writes OUT/trace, a snapshot of the weights after every optimizer step
(OUT/snaps/step_K.pt, saved before the trace sees the step) and, every 5 steps,
a checkpoint OUT/ckpt/step=K.ckpt. At the end it saves OUT/final.pt.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import IndexedDataset, TraceCallback
from lightning_tracetrain.trainer import quiet_trainer


class SlowNet(pl.LightningModule):
    def __init__(self, sleep: float = 0.0, snaps: str = "", momentum: float = 0.9, hold: str = "") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 36, 16)  # with storage="factored" this one is stored as per-example factors
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        time.sleep(self.hparams.sleep)
        while self.hparams.hold and self.global_step == 10 and not Path(self.hparams.hold).exists():
            time.sleep(0.05)  # the test lets the run go on by creating the file
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.hparams.momentum)
        opt.register_step_post_hook(self._snapshot)  # registered before TraceCallback's hook, so it runs first
        return opt

    def _snapshot(self, *args: Any) -> None:
        folder = Path(self.hparams.snaps)
        step = self.trainer.global_step + 1  # weights after this many steps
        tmp = folder / f".step_{step}.{os.getpid()}.pt"
        torch.save({k: v.detach().clone() for k, v in self.named_parameters()}, tmp)
        os.replace(tmp, folder / f"step_{step}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 runs DDP (gloo)")
    parser.add_argument("--epochs", type=int, default=-1)
    parser.add_argument("--storage", default="lossless", help="TraceCallback storage (factored: plain SGD)")
    parser.add_argument("--trace", default=None, help="where the trace goes (default OUT/trace; may be a URL)")
    parser.add_argument("--overwrite", action="store_true", help="TraceCallback(overwrite=True)")
    parser.add_argument("--hold", default="", help="wait at global step 10 until this file exists")
    args = parser.parse_args()
    (args.out / "snaps").mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = IndexedDataset(TensorDataset(torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=g)
    momentum = 0.0 if args.storage == "factored" else 0.9
    model = SlowNet(sleep=args.sleep, snaps=str(args.out / "snaps"), momentum=momentum, hold=args.hold)
    torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, args.out / "snaps" / "step_0.pt")
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        max_epochs=args.epochs,
        enable_checkpointing=True,
        callbacks=[
            TraceCallback(
                args.trace or args.out / "trace", chunk_steps=3, storage=args.storage, overwrite=args.overwrite
            ),
            ModelCheckpoint(args.out / "ckpt", filename="{step}", every_n_train_steps=5, save_top_k=-1),
        ],
    )
    trainer.fit(model, loader, ckpt_path=args.resume)
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, args.out / "final.pt")


if __name__ == "__main__":
    main()
