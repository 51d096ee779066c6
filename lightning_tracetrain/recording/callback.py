"""TraceCallback: Lightning's hooks mapped onto a :class:`~lightning_tracetrain.recording.recorder.TraceRecorder`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tracetrain.batch import batch_ghost, batch_index, batch_labels
from lightning_tracetrain.recording.classes import class_spec
from lightning_tracetrain.recording.factored import check_plain_sgd
from lightning_tracetrain.recording.layers import select_layers
from lightning_tracetrain.recording.recorder import RecorderOptions, StepInfo, TraceRecorder
from lightning_tracetrain.recording.space import space_warning, step_bytes
from lightning_tracetrain.trace.codecs import Compressor, make_compressor
from lightning_tracetrain.trace.schema import StorageMode
from lightning_tracetrain.trace.store import ResumeState
from lightning_tracetrain.trainer import quiet_logs


class TraceCallback(Callback):
    """Store each traced layer's weight and bias change after every optimizer step.

    The trace (a Zarr v3 group at ``dirpath``) holds the initial weights, one
    delta per optimizer step, and per step the global step, epoch, batch index,
    learning rates, the ids, labels and ghost flags of the examples that
    produced it, and whether AMP skipped it. Open it with
    :class:`~lightning_tracetrain.Trace`. It is created at the first optimizer
    step, so a run that fails before it leaves nothing behind.

    Training batches must carry dataset ids (``batch["index"]``); wrap the
    training dataset with :class:`~lightning_tracetrain.IndexedDataset`.

    Args:
        dirpath: Where the trace is written (created if missing): a local folder or an fsspec URL
            such as ``s3://bucket/runs/trace`` (needs ``s3fs``; see ``storage_options``).
        layers: Layers to trace: ``None`` for every Linear/Conv layer (torch or
            PyG), or qualified names / glob patterns such as ``"features.*"``.
        compressor: ``"auto"`` (default: Blosc lz4 for ``lossless`` and ``factored``, zstd for ``compact``),
            ``"lz4"``, ``"zstd"``, ``None`` or a Zarr codec
            (see :func:`~lightning_tracetrain.trace.codecs.make_compressor`).
        storage: ``"lossless"`` (default): deltas exactly as float32. ``"compact"``: each delta rounded to
            ``keepbits`` mantissa bits (BitRound) before shuffle and compression, with error feedback: the
            rounding error of a step is added to the next step's delta, so ``initial + sum of deltas`` stays
            within one step's rounding of the true weights at every step (a checkpoint keeps the error, so this
            holds across a resume too). ``"factored"`` (plain SGD only: no momentum, weight decay, clipping
            or mixed precision, one process): every ``torch.nn.Linear`` layer with one input row per example
            whose factors are smaller (``rows * (in + out) < in * out`` at the first step) is stored as
            per-example factors (its input rows and ``-lr`` times its output gradients), which the explainer
            splits over each step's examples exactly; other layers as lossless deltas. The first step of
            every run is checked against the actual weight change; runs whose steps do not factor are refused.
            ``"lowrank"`` (any optimizer): the weight change of every conv/linear layer whose factors are smaller
            is stored as a rank-``rank`` product ``P_t Q_t^T`` (one warm-started power iteration per step, as
            PowerSGD does, on the training device); biases and small layers stay lossless. What the products
            miss is kept as a residual, written with every checkpoint and at the end, so the decomposition and
            its completeness stay exact: the residual is reported as an unattributed share.
        keepbits: Mantissa bits kept by ``storage="compact"`` (float32 has 23; default 4).
        rank: The rank of each step's product under ``storage="lowrank"`` (default 8, from the bytes-vs-fidelity
            curve in the README).
        feedback: ``storage="lowrank"``: add each step's residual to the next step before factoring it
            (error feedback). The residual then stays about one step's error, but part of a step's change is
            attributed to the next steps, possibly of another class; off by default (docs/method.md).
        chunk_steps: Steps per stored chunk; by default about 32 MiB of deltas (at most 256 steps).
        overwrite: Replace a trace already at ``dirpath`` instead of failing.
        storage_options: Options of the fsspec filesystem of a URL ``dirpath`` (for S3: ``endpoint_url``,
            ``key``, ``secret``, ...); without them fsspec reads the environment (``AWS_ENDPOINT_URL``, ...).
        max_pending_steps: Steps that may wait for the writer before training
            waits for it (backpressure).
        commit_every_s: Commit a partly filled chunk after this many seconds, so a
            crash loses at most that much of a slow run.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TraceCallback("runs/trace")], max_epochs=1)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> Trace("runs/trace").num_steps == trainer.global_step  # doctest: +SKIP
        True

    With momentum or Adam a step's delta also carries earlier batches' gradients
    (the optimizer's state); it is still exactly the change of the weights.
    """

    def __init__(
        self,
        dirpath: str | Path,
        layers: str | list[str] | None = None,
        *,
        compressor: Compressor = "auto",
        storage: StorageMode = StorageMode.lossless,
        keepbits: int = 4,
        rank: int = 8,
        feedback: bool = False,
        chunk_steps: int | None = None,
        overwrite: bool = False,
        max_pending_steps: int = 8,
        commit_every_s: float = 30.0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if chunk_steps is not None and chunk_steps < 1:
            raise ValueError(f"chunk_steps must be at least 1, got {chunk_steps}.")
        if max_pending_steps < 1:
            raise ValueError(f"max_pending_steps must be at least 1, got {max_pending_steps}.")
        if storage not in set(StorageMode):
            raise ValueError(f"Unknown storage {storage!r}: use one of {', '.join(map(repr, map(str, StorageMode)))}.")
        if not 0 <= keepbits <= 23:
            raise ValueError(f"keepbits must be between 0 and 23 (float32 mantissa bits), got {keepbits}.")
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}.")
        make_compressor(compressor, StorageMode(storage))  # an unknown name fails here, not when training starts
        self.dirpath = str(dirpath)
        self.layers = layers
        self.options = RecorderOptions(
            self.dirpath, StorageMode(storage), keepbits, rank, feedback, compressor, chunk_steps, overwrite,
            max_pending_steps, commit_every_s, storage_options,
        )  # fmt: skip
        self._recorder: TraceRecorder | None = None
        self._resume: ResumeState | None = None  # from the checkpoint being resumed
        self._state: ResumeState | None = None  # of the last fit, for a checkpoint saved after it
        self._trainer: pl.Trainer | None = None
        self._hooks: list[Any] = []
        self._next_step: int | None = None  # global step of the next record
        self._batch_idx = -1
        self._saved_step: int | None = None  # global step of the last checkpoint saved, until its file is noted
        self._files: dict[str, float] = {}  # checkpoint files seen, with their modification times

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath)

    # ------------------------------------------------------------------ life cycle

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
            raise NotImplementedError(
                f"TraceCallback does not support {type(trainer.strategy).__name__} yet: its parameters are sharded. "
                "Use strategy='ddp' (rank 0 records the full weights)."
            )
        layers = select_layers(pl_module, self.layers)
        if self.options.storage == StorageMode.factored:
            check_plain_sgd(
                {n: m for n, m in layers.items() if isinstance(m, torch.nn.Linear)},
                trainer.optimizers,
                world_size=trainer.world_size,
                precision=str(trainer.precision),
                gradient_clip_val=trainer.gradient_clip_val,
            )
        self._trainer, self._next_step, self._batch_idx = trainer, None, -1
        if trainer.datamodule is None:
            rank_zero_info(
                "TraceCallback: this run has no LightningDataModule (trainer.fit got dataloaders), so the trace names "
                "none; `python -m lightning_tracetrain explain` then needs --test-data MODULE:FUNCTION (a function "
                "returning the test dataset) to find its queries. Explainer takes any query batches from Python."
            )
        self._warn_if_too_large(trainer, layers)  # on every rank: sizing the loader may synchronize the ranks
        if trainer.is_global_zero:
            self._recorder = TraceRecorder(self.options)
            self._recorder.start(
                layers,
                module=class_spec(pl_module),
                datamodule=class_spec(trainer.datamodule) if trainer.datamodule is not None else None,
                optimizers=trainer.optimizers,
                resume=self._resume,
            )
        self._hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]

    def _warn_if_too_large(self, trainer: pl.Trainer, layers: dict[str, torch.nn.Module]) -> None:
        """Warn (rank 0) at fit start when the projected trace exceeds the free space at dirpath (recording.space)."""
        if self._resume is not None:
            return  # a resumed run's remaining steps: the trace already holds the rest
        sizes = step_bytes(layers, self.options.storage, self.options.rank)
        try:
            with quiet_logs():  # Lightning says it loads the train dataloader early (it would a moment later)
                steps = float(trainer.estimated_stepping_batches)
        except Exception:  # a loader Lightning cannot size: no projection, and never a failed fit for it
            return
        lowrank = sum(step_bytes(layers, StorageMode.lowrank).values())
        warning = space_warning(sizes, steps, self.options.storage, str(self.dirpath), lowrank)
        if warning is not None:
            rank_zero_warn(warning)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._next_step is None:  # global_step is restored from a checkpoint only after on_fit_start
            self._next_step = trainer.global_step
            self._check_continuity(trainer.global_step)
        self._note_checkpoints(trainer)
        index = batch_index(batch)
        label = batch_labels(batch, len(index))
        ghost = batch_ghost(batch, len(index))
        if trainer.world_size > 1:
            index, ghost = _gather_rows(trainer, index), _gather_rows(trainer, ghost.to(torch.uint8)).bool()
            label = None if label is None else _gather_rows(trainer, label)
        self._batch_idx = batch_idx
        if self._recorder is not None:
            self._recorder.add_examples(
                index.cpu().numpy(), None if label is None else label.detach().cpu().numpy(), ghost.cpu().numpy()
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._record_skipped(trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(raise_errors=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(raise_errors=False)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(raise_errors=False)  # commits what is buffered; the original exception propagates

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._state
        if self._recorder is not None and self._trainer is not None:
            # a checkpoint must never be ahead of the trace: commit everything up to this step first
            self._record_skipped(self._trainer.global_step)
            state = self._recorder.commit()
            self._saved_step = self._trainer.global_step  # its file is noted once ModelCheckpoint has written it
        if state is None:
            return {"run_id": None, "records": 0}
        carry = None if state.carry is None else torch.from_numpy(state.carry)
        return {"run_id": state.run_id, "records": state.records, "carry": carry}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("run_id"):
            carry = state_dict.get("carry")
            self._resume = ResumeState(
                str(state_dict["run_id"]), int(state_dict["records"]), None if carry is None else carry.numpy()
            )

    # ------------------------------------------------------------------ steps

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return
        step = trainer.global_step  # Lightning counts the step only after optimizer.step() returns
        self._record_skipped(step)
        if self._recorder is not None:
            self._recorder.record(self._info(step))
        self._next_step = step + 1

    def _record_skipped(self, global_step: int) -> None:
        """Steps Lightning counted without an optimizer step (AMP found inf/nan): zero deltas."""
        if self._next_step is None:
            return
        while self._next_step < global_step:
            if self._recorder is not None:
                self._recorder.record_skipped(self._info(self._next_step))
            self._next_step += 1

    def _info(self, step: int) -> StepInfo:
        trainer = self._trainer
        assert trainer is not None
        lrs = [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        return StepInfo(step, trainer.current_epoch, self._batch_idx, lrs)

    def _check_continuity(self, global_step: int) -> None:
        """On resume, the trace's last committed step must be the one right before this run's first."""
        last = None if self._recorder is None else self._recorder.last_global_step()
        if last is not None and last + 1 != global_step:
            raise RuntimeError(
                f"The trace at {self.dirpath} ends at global step {last}, but training continues at step "
                f"{global_step}; resume from the checkpoint that was saved with this trace."
            )

    def _note_checkpoints(self, trainer: pl.Trainer | None) -> None:
        """Tell the trace which files the last checkpoint save wrote (ModelCheckpoint writes them after asking
        for this callback's state, so they are found at the next hook by their modification times)."""
        if self._saved_step is None or self._recorder is None or trainer is None:
            return
        for callback in trainer.checkpoint_callbacks:
            paths = {
                getattr(callback, "_last_checkpoint_saved", ""),
                callback.last_model_path,
                callback.best_model_path,
            }
            for path in filter(None, paths | set(getattr(callback, "best_k_models", {}))):
                changed = os.path.getmtime(path) if os.path.exists(path) else None
                if changed is not None and self._files.get(path) != changed:
                    self._files[path] = changed
                    self._recorder.note_checkpoint(os.path.abspath(path), self._saved_step)
        self._saved_step = None

    def _close(self, *, raise_errors: bool) -> None:
        self._note_checkpoints(self._trainer)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        recorder, self._recorder = self._recorder, None
        self._trainer, self._resume = None, None  # a later fit with this callback starts afresh (or resumes)
        if recorder is not None:
            try:
                recorder.close(raise_errors=raise_errors)
            finally:
                self._state = recorder.commit()


def _gather_rows(trainer: pl.Trainer, t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor of varying length over all ranks (rank order)."""
    device = trainer.strategy.root_device
    t = t.to(device)
    sizes = trainer.strategy.all_gather(torch.tensor([t.shape[0]], device=device)).reshape(-1).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    gathered = trainer.strategy.all_gather(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)]).cpu()
