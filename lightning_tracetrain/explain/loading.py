"""Rebuilding the traced model and datamodule from a trace and a checkpoint, without trusting either.

A trace records the import paths of the LightningModule and LightningDataModule
it was made with, and a checkpoint is a pickle. Both may come from someone
else, so a class is imported only from this package, from a module the user
trusts (``Trust(modules=...)``, ``--trust-module PREFIX``) or when the user
trusts the trace outright (``--trust-trace``); a checkpoint is read with
``torch.load(weights_only=True)`` (tensors and plain data only) unless the
user trusts it outright.
"""

from __future__ import annotations

import importlib
import io
import pathlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tracetrain.exceptions import TraceMismatchError, UntrustedCodeError
from lightning_tracetrain.trace import ClassSpec, Trace

_PACKAGE = __name__.split(".")[0]
# plain data that Lightning may put in a checkpoint besides tensors: safe to rebuild
_SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


@dataclass(frozen=True)
class Trust:
    """Which code a trace or checkpoint may make this process import or unpickle.

    Args:
        modules: Import-path prefixes whose classes may be imported (``"mypkg"`` allows ``mypkg.models.Net``),
            besides this package's own.
        everything: Import any class the trace names and unpickle the checkpoint without restriction: only
            for traces and checkpoints you made yourself or received from someone you trust.
    """

    modules: tuple[str, ...] = ()
    everything: bool = False

    def allows(self, module: str) -> bool:
        prefixes = (_PACKAGE, *self.modules)
        return self.everything or any(module == p or module.startswith(f"{p}.") for p in prefixes)


def import_class(spec: ClassSpec, base: type, trust: Trust, what: str) -> type:
    """The class a trace names, if trusted and a subclass of ``base`` (a LightningModule or LightningDataModule)."""
    module, _, name = spec.class_path.rpartition(".")
    if not trust.allows(module):
        top = module.split(".")[0]
        raise UntrustedCodeError(
            f"The trace names {what} {spec.class_path}; importing it would run the code of module {module!r}, "
            f"which is not trusted. If you trust whoever made the trace, pass --trust-module {top} "
            f"(Trust(modules=({top!r},)) from Python), or --trust-trace to trust every class it names."
        )
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        where = "move it into an importable module, " if "<locals>" in module or module == "__main__" else ""
        raise TraceMismatchError(
            f"Cannot import {spec.class_path}, the {what} the trace recorded ({type(exc).__name__}: {exc}); "
            f"{where}install the code that trained the model."
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TraceMismatchError(f"{spec.class_path}, the {what} the trace names, is not a {base.__name__}.")
    return cls


def saved_checkpoints(trace: Trace) -> str:
    """The checkpoints the trace's run saved (still on disk), as a sentence for an error; '' when none is known."""
    found = [c for c in trace.attrs.get("checkpoints", []) if "://" in c["path"] or Path(c["path"]).exists()]
    if not found:
        return ""
    listed = ", ".join(f"{_shown(c['path'])} (global step {c['global_step']})" for c in found[-5:])
    return f" The run that wrote this trace saved: {listed}."


def check_run(checkpoint: dict[str, Any], ckpt: str | Path, trace: Trace) -> None:
    """A checkpoint whose TraceCallback state names another run than the trace's does not belong to it."""
    states = [v for k, v in (checkpoint.get("callbacks") or {}).items() if str(k).startswith("TraceCallback")]
    runs = {str(s["run_id"]) for s in states if isinstance(s, dict) and s.get("run_id")}
    if runs and trace.run_id not in runs:
        hint = saved_checkpoints(trace) or " Use a checkpoint of that run."
        raise TraceMismatchError(
            f"The checkpoint {ckpt} was saved by another run (trace run {', '.join(sorted(runs))}) than the one that "
            f"wrote the trace at {trace.path} (run {trace.run_id}).{hint}"
        )


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it is below it (as a user would type it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def read_checkpoint(ckpt: str | Path, trust: Trust) -> dict[str, Any]:
    """A Lightning checkpoint (a path or fsspec URL) as a dict, read once, unpickling plain data only."""
    try:
        with fsspec.open(str(ckpt), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TraceMismatchError(f"No checkpoint at {ckpt}: the file does not exist.") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust.everything)
    except Exception as exc:
        if not trust.everything and "weights_only" in str(exc):
            raise UntrustedCodeError(
                f"The checkpoint {ckpt} holds objects other than tensors and plain data, and unpickling them could "
                f"run code ({str(exc).splitlines()[0]}). If you trust it, pass --trust-trace."
            ) from exc
        raise TraceMismatchError(f"{ckpt} is not a readable checkpoint ({type(exc).__name__}: {exc}).") from exc


def load_model(trace: Trace, ckpt: str | Path, trust: Trust = Trust()) -> tuple[pl.LightningModule, int]:
    """The traced LightningModule with the checkpoint's weights, and the checkpoint's global step.

    The class is the one the trace recorded; its arguments are the checkpoint's hyperparameters
    (or the trace's); nothing the checkpoint names is imported.
    """
    try:
        checkpoint = read_checkpoint(ckpt, trust)  # before any import: a bad checkpoint runs no code at all
    except TraceMismatchError as exc:
        raise TraceMismatchError(f"{exc}{saved_checkpoints(trace)}") from exc.__cause__
    if "state_dict" not in checkpoint:
        raise TraceMismatchError(f"{ckpt} is not a Lightning checkpoint: it has no 'state_dict'.")
    check_run(checkpoint, ckpt, trace)
    cls = import_class(trace.module, pl.LightningModule, trust, "model")
    saved = checkpoint.get("hyper_parameters")
    init_args = trace.module.init_args if saved is None else {k: v for k, v in saved.items() if not k.startswith("_")}
    try:
        model = cls(**init_args)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise TraceMismatchError(
            f"The checkpoint {ckpt} does not fit {trace.module.class_path}, the model the trace at {trace.path} "
            f"recorded: the checkpoint and the trace are of different models ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]})."
        ) from exc
    return model.eval(), int(checkpoint.get("global_step", -1))


def load_datamodule(trace: Trace, trust: Trust = Trust()) -> pl.LightningDataModule:
    """The LightningDataModule the trace recorded, set up for fitting and testing (queries come from its test set)."""
    if trace.datamodule is None:
        raise TraceMismatchError(
            f"The trace at {trace.path} was recorded without a LightningDataModule (trainer.fit got dataloaders), so "
            "there is no test set to take queries from: pass --test-data MODULE:FUNCTION, a function returning your "
            "test Dataset, or fit with a LightningDataModule next time."
        )
    datamodule = import_class(trace.datamodule, pl.LightningDataModule, trust, "datamodule")(
        **trace.datamodule.init_args
    )
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def load_test_data(spec: str) -> DataLoader:
    """``MODULE:FUNCTION`` (``--test-data``): the test set the function returns, as a DataLoader of one example.

    The function may return a Dataset, a DataLoader or a LightningDataModule (its test dataloader).
    The user named the module, so importing it is their explicit choice.
    """
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TraceMismatchError(
            f"--test-data {spec}: cannot import {name} from {module} ({type(exc).__name__}: {exc})."
        ) from exc
    data = function()
    if isinstance(data, pl.LightningDataModule):
        data.setup("test")
        data = data.test_dataloader()
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=1)
    raise TraceMismatchError(
        f"--test-data {spec} returned a {type(data).__name__}; it must return a Dataset, a DataLoader or a "
        "LightningDataModule."
    )


def steps_until(trace: Trace, global_step: int) -> int:
    """How many recorded steps a checkpoint saved at ``global_step`` had taken."""
    if global_step < 0:
        return trace.num_steps
    return int(np.searchsorted(trace.steps.global_step, global_step, side="left"))
