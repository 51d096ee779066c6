"""Training overhead of tracing: traced over untraced wall time per step, same model and steps.

Runs alternate (untraced, traced, untraced, ...) in one process, so both see the
same machine state; the reported ratio is the median of per-pair ratios. The
timed span is the training loop plus the trace's final commit at fit end (the
one-off creation of the trace is reported separately). Workloads:

- ``digits``: the digits CNN of configs/digits.yaml on the embedded data (single-class batches
  of 32 plus 10 ghosts, ghost batch norm: what ``make demo`` trains);
- ``digits-plain``: the same CNN with its defaults on ordinary shuffled batches of 32 (plain
  batch norm): a step 3x cheaper, so the same recording cost weighs 3x more;
- ``digits-wide``: a parameter-heavy digits CNN (conv 32 and 64 channels, a 1024 -> 128 Linear, 151k
  parameters, 0.6 MB of deltas per step) on shuffled batches of 32, plain SGD with momentum: the
  recording path's cost shows, as it does for most users' models on CPU;
- ``digits-factored``: configs/digits_factored.yaml (shuffled batches of 32, plain SGD), for
  ``--storage factored``;
- ``vgg16``: the paper's VGG-16 for CIFAR-10 on synthetic tensors of CIFAR's shape;
- ``gin``: the paper's 5-layer ppa GIN on synthetic graphs of ogbg-ppa's size.

Writes a JSON result with machine details.

    python benchmarks/overhead.py [--workload digits] [--accelerator cpu] [--steps 400] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_tracetrain import IndexedDataset, StorageMode, Trace, TraceCallback
from lightning_tracetrain.batch import loader_class
from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.models import VGG16, PpaGIN

WORKLOADS = ("digits", "digits-plain", "digits-wide", "digits-factored", "vgg16", "gin")


class _Timer(pl.Callback):
    """Wall time from the first training batch to the end of fit (after the trace's final commit)."""

    def __init__(self, device_type: str) -> None:
        self.cuda = device_type == "cuda"
        self.fit_start = 0.0  # set by the caller right before trainer.fit

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.setup_s = self._now() - self.fit_start  # since trainer.fit was called: includes the trace's creation
        self.start = self._now()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = self._now() - self.start  # runs after TraceCallback.on_fit_end: the final commit is in
        self.fit_s = self._now() - self.fit_start  # the whole fit: setup, the trace's creation, steps, close


def _graphs(n: int, seed: int = 0) -> list[Any]:
    """Random graphs of ogbg-ppa's size (about 240 nodes, 2,300 edges, 7 edge features, 37 classes)."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        nodes = int(torch.randint(150, 330, (), generator=g))
        edges = torch.randint(0, nodes, (2, 9 * nodes), generator=g)
        out.append(
            Data(
                x=torch.zeros(nodes, dtype=torch.long),
                edge_index=edges,
                edge_attr=torch.rand(edges.shape[1], 7, generator=g),
                y=torch.randint(0, 37, (1,), generator=g),
            )
        )
    return out


def workload(name: str, batch_size: int | None) -> tuple[pl.LightningModule, Any]:
    """A fresh model and training data (a datamodule or a DataLoader following the batch protocol)."""
    if name == "digits":
        return build("digits")
    if name == "digits-plain":  # the CNN's defaults (no batch norm, SGD momentum 0.9, lr 0.05) on shuffled batches
        model, data = build("digits", data={"single_class": False, "ghost_size": 0, "batch_size": batch_size or 32})
        return type(model)(), data
    if name == "digits-wide":
        model, data = build("digits", data={"single_class": False, "ghost_size": 0, "batch_size": batch_size or 32})
        return type(model)(channels=32, hidden=128), data
    if name == "digits-factored":
        return build("digits_factored")
    g = torch.Generator().manual_seed(0)
    dataset: Dataset
    if name == "vgg16":
        model: pl.LightningModule = VGG16(ghost_batch_norm=False)
        dataset = TensorDataset(torch.randn(2048, 3, 32, 32, generator=g), torch.randint(0, 10, (2048,), generator=g))
        batch_size = batch_size or 128
    elif name == "gin":
        model, dataset, batch_size = PpaGIN(ghost_batch_norm=False), _graphs(512), batch_size or 32  # type: ignore[assignment]
    else:
        raise ValueError(f"Unknown workload {name!r}: use one of {', '.join(WORKLOADS)}.")
    indexed = IndexedDataset(dataset)
    return model, loader_class(indexed)(indexed, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)


def _run(args: argparse.Namespace, steps: int, trace_dir: str | None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model, data = workload(args.workload, args.batch_size)
    device = "cuda" if args.accelerator in ("gpu", "cuda") else args.accelerator
    timer = _Timer(device)
    callbacks: list[pl.Callback] = []
    if trace_dir is not None:
        callbacks.append(TraceCallback(trace_dir, overwrite=True, storage=args.storage))
    callbacks.append(timer)  # last: its on_fit_end runs after the trace's final commit
    trainer = quiet_trainer(accelerator=args.accelerator, max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    timer.fit_start = timer._now()  # not in on_fit_start: this callback's hooks run after the TraceCallback's
    if isinstance(data, DataLoader):
        trainer.fit(model, data)
    else:
        trainer.fit(model, datamodule=data)
    out: dict[str, Any] = {
        "seconds": timer.seconds,
        "setup_s": timer.setup_s,
        "fit_s": timer.fit_s,
        "steps": trainer.global_step,
    }
    if trace_dir is not None:
        trace = Trace(trace_dir)
        out["recorded_steps"] = trace.num_steps
        out["chunk_steps"] = trace.spec.chunk_steps
        out.update({f"bytes_{k}": v for k, v in trace.nbytes().items()})
    return out


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="digits")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="digits: configs/digits.yaml's; vgg16 128; gin 32")
    parser.add_argument("--storage", default="lossless", choices=list(StorageMode))
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/overhead_WORKLOAD_ACC.json")
    return parser


def main() -> None:
    args = parser().parse_args()
    suffix = "" if args.storage == "lossless" else f"_{args.storage}"
    out = args.out or Path(f"benchmarks/results/overhead_{args.workload}{suffix}_{args.accelerator}.json")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        _run(args, min(20, args.steps), None)  # warm-up: imports, allocator, data, kernels
        pairs = []
        for r in range(args.repeats):
            plain = _run(args, args.steps, None)
            traced = _run(args, args.steps, f"{tmp}/trace{r}")
            assert traced["recorded_steps"] == traced["steps"] == plain["steps"]
            untraced = {f"untraced_{k}": plain[k] for k in ("setup_s", "fit_s")} | {"untraced_s": plain["seconds"]}
            pairs.append({**untraced, "traced_s": traced["seconds"], **traced})
    ratios = [p["traced_s"] / p["untraced_s"] for p in pairs]
    fit_ratios = [p["fit_s"] / p["untraced_fit_s"] for p in pairs]
    step_mb = pairs[-1]["bytes_raw"] / max(1, pairs[-1]["recorded_steps"]) / 2**20
    cmd = f"python benchmarks/overhead.py --workload {args.workload} --accelerator {args.accelerator} "
    cmd += f"--steps {args.steps} --repeats {args.repeats} --storage {args.storage}"
    cmd += f" --batch-size {args.batch_size}" if args.batch_size else ""
    result = {
        "benchmark": f"training overhead, {args.workload}",
        "command": cmd,
        "storage": args.storage,
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "fit_ratio_median": statistics.median(fit_ratios),  # the whole trainer.fit, fixed costs included
        "fit_ratios": fit_ratios,
        "mb_per_step": step_mb,
        "ms_per_step_untraced": 1000 * statistics.median(p["untraced_s"] for p in pairs) / args.steps,
        "ms_per_step_traced": 1000 * statistics.median(p["traced_s"] for p in pairs) / args.steps,
        "trace_creation_s": statistics.median(p["setup_s"] - p["untraced_setup_s"] for p in pairs),
        "storage_ratio": pairs[-1]["bytes_stored"] / pairs[-1]["bytes_raw"],
        "runs": pairs,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "accelerator": args.accelerator,
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{args.workload}: traced/untraced per step {result['ratio_median']:.3f}x (median of {args.repeats}); "
        f"{result['ms_per_step_untraced']:.2f} -> {result['ms_per_step_traced']:.2f} ms/step; "
        f"whole fit {result['fit_ratio_median']:.3f}x; {step_mb:.2f} MB of deltas per step; "
        f"stored/raw bytes {result['storage_ratio']:.3f}; written to {out}"
    )


if __name__ == "__main__":
    main()
