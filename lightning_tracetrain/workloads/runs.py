"""Traced training runs of a workload and batches of its data, shared by the evaluation and the benchmarks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_tracetrain.batch import loader_class
from lightning_tracetrain.recording import TraceCallback
from lightning_tracetrain.trace import Trace
from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build


def trainer(epochs: int, **kwargs: Any) -> pl.Trainer:
    """A quiet Trainer for ``epochs`` epochs on one device (single-class batches shard by themselves)."""
    return quiet_trainer(max_epochs=epochs, use_distributed_sampler=False, **kwargs)


def train_traced(
    name: str, folder: Path, epochs: int, seed: int = 0, data: dict[str, Any] | None = None
) -> tuple[pl.LightningModule, pl.LightningDataModule, Trace]:
    """The workload ``configs/NAME.yaml`` (datamodule ``seed`` and ``data`` overrides), traced into ``folder``."""
    pl.seed_everything(seed, verbose=False)
    model, datamodule = build(name, data={"seed": seed, **(data or {})})
    trainer(epochs, callbacks=[TraceCallback(folder, overwrite=True)]).fit(model, datamodule)
    return model.eval(), datamodule, Trace(folder)


def trace_modes(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, folder: Path, modes: dict[str, dict], epochs: int
) -> dict[str, Trace]:
    """One run traced once per storage mode at the same time, so all traces hold the same steps.

    ``modes`` maps a storage mode to further TraceCallback arguments (``{"compact": {"keepbits": 4}}``), or
    any name to arguments that name the mode (``{"lowrank-r8": {"storage": "lowrank", "rank": 8}}``).
    """
    callbacks = [TraceCallback(folder / name, **{"storage": name, **kwargs}) for name, kwargs in modes.items()]
    trainer(epochs, callbacks=callbacks).fit(model, datamodule)
    return {mode: Trace(folder / mode) for mode in modes}


def storage_ratios(traces: dict[str, Trace]) -> dict[str, dict[str, float]]:
    """Per trace: stored and float32 bytes of its deltas, and their ratio."""
    out = {}
    for mode, trace in traces.items():
        nbytes = trace.nbytes()
        out[mode] = {"stored_over_float32": nbytes["stored"] / nbytes["raw"], **nbytes}
    return out


def single_batches(dataset: Any, ids: Sequence[int]) -> list[dict[str, Tensor]]:
    """Each example as a batch of one (the Explainer's queries)."""
    collate = loader_class(dataset)(dataset).collate_fn  # PyG's for graphs
    return [collate([dataset[i]]) for i in ids]


def batches(dataset: Any, ids: Sequence[int] | None = None, size: int = 256) -> list[dict[str, Tensor]]:
    """The examples ``ids`` (default: all) in batches of ``size``, in order."""
    ids = list(range(len(dataset))) if ids is None else list(ids)
    collate = loader_class(dataset)(dataset).collate_fn
    return [collate([dataset[i] for i in ids[s : s + size]]) for s in range(0, len(ids), size)]


def write_result(out: Path, result: dict[str, Any], table: str) -> None:
    """A benchmark's result: the machine added, written as JSON to ``out``, its Markdown ``table`` printed."""
    import os
    import platform

    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine}, indent=2))
    print(table)
    print(f"wrote {out}")
