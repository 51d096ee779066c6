"""Single-class batches need ghost batch norm: test accuracy of three digits CNNs.

1. ordinary shuffled batches, plain batch norm (the reference);
2. single-class batches with ghost samples and ghost batch norm (the paper's Algorithm 2);
3. single-class batches with plain batch norm (what goes wrong without ghosts).

Same CNN, optimizer, learning-rate schedule and number of epochs; mean over seeds.

    python benchmarks/ghost_batchnorm.py [--epochs 10] [--seeds 0 1 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build

# configs/digits.yaml (single-class batches of 32 + 10 ghosts, ghost batch norm, cosine decay) and two variants
PLAIN_BATCH_NORM = {"ghost_batch_norm": False, "batch_norm": True}
VARIANTS: dict[str, dict[str, Any]] = {
    "shuffled_batchnorm": {"data": {"single_class": False, "ghost_size": 0}, "model": PLAIN_BATCH_NORM},
    "single_class_ghost_batchnorm": {"data": {}, "model": {}},
    "single_class_plain_batchnorm": {"data": {"ghost_size": 0}, "model": PLAIN_BATCH_NORM},
}


def accuracy_of(variant: str, epochs: int, seed: int) -> float:
    """Train one variant and return its test accuracy."""
    spec = VARIANTS[variant]
    pl.seed_everything(seed, verbose=False)
    model, datamodule = build("digits", model=spec["model"], data={"seed": seed, **spec["data"]})
    trainer = quiet_trainer(max_epochs=epochs, accelerator="cpu", limit_val_batches=0)
    trainer.fit(model, datamodule)
    (result,) = trainer.test(model, datamodule, verbose=False)
    return float(result["test_acc"])


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ghost_batchnorm_digits.json"))
    return parser


def main() -> None:
    args = parser().parse_args()
    runs = {v: [accuracy_of(v, args.epochs, s) for s in args.seeds] for v in VARIANTS}
    result = {
        "benchmark": "digits test accuracy: shuffled vs single-class batches, with and without ghost batch norm",
        "command": f"python benchmarks/ghost_batchnorm.py --epochs {args.epochs} --seeds "
        + " ".join(map(str, args.seeds)),
        "mean_test_accuracy": {v: statistics.mean(a) for v, a in runs.items()},
        "runs": runs,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for v, acc in result["mean_test_accuracy"].items():
        print(f"{v:<32} {acc:.3f}  {runs[v]}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
