"""Training overhead of tracing: traced over untraced wall time per step, same model and steps.

Runs alternate (untraced, traced, untraced, ...) in one process, so both see the
same machine state; the reported ratio is the median of per-pair ratios.
Writes a JSON result with machine details.

    python benchmarks/overhead.py [--steps 400] [--repeats 5] [--out benchmarks/results/overhead_digits_cpu.json]
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

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.data import DigitsDataModule
from lightning_tracetrain.models import DigitsCNN


class _Timer(pl.Callback):
    """Wall time of the training loop alone (no setup, no teardown)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def _run(steps: int, trace_dir: str | None, accelerator: str) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    timer = _Timer()
    callbacks: list[pl.Callback] = [timer]
    if trace_dir is not None:
        callbacks.append(TraceCallback(trace_dir, overwrite=True))
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=32))
    out: dict[str, Any] = {"seconds": timer.seconds, "steps": trainer.global_step}
    if trace_dir is not None:
        trace = Trace(trace_dir)
        out["recorded_steps"] = trace.num_steps
        out.update({f"bytes_{k}": v for k, v in trace.nbytes().items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead_digits_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        _run(20, None, args.accelerator)  # warm-up: imports, allocator, data
        pairs = []
        for r in range(args.repeats):
            plain = _run(args.steps, None, args.accelerator)
            traced = _run(args.steps, f"{tmp}/trace{r}", args.accelerator)
            assert traced["recorded_steps"] == traced["steps"] == plain["steps"]
            pairs.append({"untraced_s": plain["seconds"], "traced_s": traced["seconds"], **traced})
    ratios = [p["traced_s"] / p["untraced_s"] for p in pairs]
    result = {
        "benchmark": "training overhead, digits CNN",
        "command": "python benchmarks/overhead.py " + f"--steps {args.steps} --repeats {args.repeats}",
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "ms_per_step_untraced": 1000 * statistics.median(p["untraced_s"] for p in pairs) / args.steps,
        "ms_per_step_traced": 1000 * statistics.median(p["traced_s"] for p in pairs) / args.steps,
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"traced/untraced per step: {result['ratio_median']:.3f}x (median of {args.repeats}); "
        f"{result['ms_per_step_untraced']:.2f} -> {result['ms_per_step_traced']:.2f} ms/step; "
        f"stored/raw bytes {result['storage_ratio']:.3f}; written to {args.out}"
    )


if __name__ == "__main__":
    main()
