"""TraceCallback: record every optimizer step's weight changes into a trace."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor
from typing_extensions import override

from lightning_tracetrain.batch import batch_ghost, batch_index, batch_labels
from lightning_tracetrain.factors import FactorRecorder, check_plain_sgd, check_step, param_group, step_factors
from lightning_tracetrain.functional import weight_deltas
from lightning_tracetrain.layers import layer_parameters, select_layers
from lightning_tracetrain.trace.schema import ClassSpec, LayerSpec, TraceSpec
from lightning_tracetrain.trace.writer import (
    STORAGE_MODES,
    Compressor,
    DeltaStager,
    ResumeState,
    StepRecord,
    TraceWriter,
    make_compressor,
    open_for_writing,
)

log = logging.getLogger(__name__)

_CHUNK_BYTES = 32 * 2**20  # steps are buffered until a chunk of about this many raw bytes is full


class TraceCallback(Callback):
    """Store each traced layer's weight and bias change after every optimizer step.

    The trace (a Zarr v3 group at ``dirpath``) holds the initial weights, one
    delta per optimizer step, and per step the global step, epoch, batch index,
    learning rates, the ids, labels and ghost flags of the examples that
    produced it, and whether AMP skipped it. Open it with
    :class:`~lightning_tracetrain.Trace`.

    Training batches must carry dataset ids (``batch["index"]``); wrap the
    training dataset with :class:`~lightning_tracetrain.IndexedDataset`.

    Args:
        dirpath: Where the trace is written (created if missing): a local folder or an fsspec URL
            such as ``s3://bucket/runs/trace`` (needs ``s3fs``; see ``storage_options``).
        layers: Layers to trace: ``None`` for every Linear/Conv layer (torch or
            PyG), or qualified names / glob patterns such as ``"features.*"``.
        compressor: ``"auto"`` (default: Blosc lz4 for ``lossless``, zstd for ``compact``), ``"lz4"``,
            ``"zstd"``, ``None`` or a Zarr codec (see :func:`~lightning_tracetrain.trace.writer.make_compressor`).
        storage: ``"lossless"`` (default): deltas exactly as float32. ``"compact"``: each delta rounded to
            ``keepbits`` mantissa bits (BitRound) before shuffle and compression, with error feedback: the
            rounding error of a step is added to the next step's delta, so ``initial + sum of deltas`` stays
            within one step's rounding of the true weights at every step (exact sums are not kept).
            ``"factored"`` (plain SGD only: no momentum, weight decay, clipping or mixed precision, one
            process): every ``torch.nn.Linear`` layer with one input row per example whose factors are
            smaller (``rows * (in + out) < in * out`` at the first step) is stored as per-example factors
            (its input rows and ``-lr`` times its output gradients), which the explainer splits over each
            step's examples exactly; other layers as lossless deltas. The first step of every run is
            checked against the actual weight change; runs whose steps do not factor are refused.
        keepbits: Mantissa bits kept by ``storage="compact"`` (float32 has 23; default 4).
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
        storage: str = "lossless",
        keepbits: int = 4,
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
        self.dirpath = str(dirpath)
        self.layers = layers
        if storage not in STORAGE_MODES:
            raise ValueError(f"Unknown storage {storage!r}: use one of {', '.join(map(repr, STORAGE_MODES))}.")
        if not 0 <= keepbits <= 23:
            raise ValueError(f"keepbits must be between 0 and 23 (float32 mantissa bits), got {keepbits}.")
        make_compressor(compressor, storage)  # an unknown name fails here, not when training starts
        self.compressor = compressor
        self.storage, self.keepbits = storage, keepbits
        self.chunk_steps = chunk_steps
        self.overwrite = overwrite
        self.max_pending_steps = max_pending_steps
        self.commit_every_s = commit_every_s
        self.storage_options = storage_options
        self._resume: ResumeState | None = None
        self._reset()

    def _reset(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._writer: TraceWriter | None = None
        self._stager: DeltaStager | None = None
        self._params: list[Tensor] = []
        self._prev: list[Tensor] = []
        self._names: list[tuple[str, str]] = []  # (layer, parameter) of each entry of _params
        self._recorder: FactorRecorder | None = None  # storage="factored": captures per-example factors
        self._factor_lr: dict[str, dict[str, Any]] = {}  # the parameter group of each candidate's weight
        self._checked = False  # the factors were checked against the first step of this fit
        self._hooks: list[Any] = []
        self._next_step: int | None = None  # global step of the next record
        self._batch_idx = -1
        self._pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []
        self._last_examples: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None = None
        self._run_id: str | None = None
        self._records = 0

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
        self._trainer = trainer
        layers = select_layers(pl_module, self.layers)
        named = [(name, p, t) for name, m in layers.items() for p, t in layer_parameters(m).items()]
        self._params = [t for _, _, t in named]
        self._names = [(name, p) for name, p, _ in named]
        spec = TraceSpec(
            layers=tuple(
                LayerSpec(name, _class_path(m), {p: tuple(t.shape) for p, t in layer_parameters(m).items()})
                for name, m in layers.items()
            ),
            module=_class_spec(pl_module),
            datamodule=_class_spec(trainer.datamodule) if trainer.datamodule is not None else None,
            lr_columns=tuple(
                f"optimizer{i}/group{j}"
                for i, opt in enumerate(trainer.optimizers)
                for j in range(len(opt.param_groups))
            ),
            chunk_steps=self.chunk_steps or _default_chunk_steps(self._params),
            compressor=None if (c := make_compressor(self.compressor, self.storage)) is None else c.to_dict(),
            mode=self.storage,
            keepbits=self.keepbits if self.storage == "compact" else None,
        )
        if trainer.is_global_zero:
            self._prev = [t.detach().float().clone() for t in self._params]
            initial = {(name, p): t.detach().float().cpu().numpy() for name, p, t in named}
            group, self._records = open_for_writing(
                self.dirpath,
                spec,
                initial,
                resume=self._resume,
                overwrite=self.overwrite,
                compressor=make_compressor(self.compressor, self.storage),
                storage_options=self.storage_options,
            )
            self._run_id = str(group.attrs["run_id"])
            self._writer = TraceWriter(
                group,
                start=self._records,
                max_pending=self.max_pending_steps,
                commit_every_s=self.commit_every_s,
                path=self.dirpath,
            )
            if self.storage == "factored":  # the stager is made at the first step, once the factored weights are known
                self._start_factors(trainer, layers)
            else:
                self._stager = self._make_stager(pl_module.device)
        self._hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]

    def _make_stager(self, device: torch.device) -> DeltaStager:
        """Staging buffers for the deltas of ``_params``, enough for every step that may wait for the writer."""
        return DeltaStager([t.shape for t in self._params], device, self.max_pending_steps + 2)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._next_step is None:  # global_step is restored from a checkpoint only after on_fit_start
            self._next_step = trainer.global_step
            self._check_continuity(trainer.global_step)
        index = batch_index(batch)
        label = batch_labels(batch, len(index))
        ghost = batch_ghost(batch, len(index))
        if trainer.world_size > 1:
            index, ghost = _gather_rows(trainer, index), _gather_rows(trainer, ghost.to(torch.uint8)).bool()
            label = None if label is None else _gather_rows(trainer, label)
        self._batch_idx = batch_idx
        if self._writer is not None:
            self._pending.append(
                (index.cpu().numpy(), None if label is None else label.detach().cpu().numpy(), ghost.cpu().numpy())
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
        if self._writer is not None and self._trainer is not None:
            # a checkpoint must never be ahead of the trace: commit everything up to this step first
            self._record_skipped(self._trainer.global_step)
            self._writer.flush()
            self._records = self._writer.committed
        return {"run_id": self._run_id, "records": self._records}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("run_id"):
            self._resume = ResumeState(str(state_dict["run_id"]), int(state_dict["records"]))

    # ------------------------------------------------------------------ recording

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return
        step = trainer.global_step  # Lightning counts the step only after optimizer.step() returns
        self._record_skipped(step)
        if self._writer is not None:
            factors = self._take_factors() if self._recorder is not None else None
            assert self._stager is not None
            staged = self._stager.stage(self._params, self._prev)
            with torch.no_grad():
                torch._foreach_copy_(self._prev, self._params)
            self._writer.put(self._record(trainer, step, staged, factors))
        self._next_step = step + 1

    def _record_skipped(self, global_step: int) -> None:
        """Steps Lightning counted without an optimizer step (AMP found inf/nan): zero deltas."""
        if self._next_step is None or self._trainer is None:
            return
        while self._next_step < global_step:
            if self._writer is not None:
                self._writer.put(self._record(self._trainer, self._next_step, None))
            self._next_step += 1

    # ------------------------------------------------------------------ storage="factored"

    def _start_factors(self, trainer: pl.Trainer, layers: dict[str, torch.nn.Module]) -> None:
        """Capture the factors of every traced Linear layer that an optimizer updates (checked to be plain SGD)."""
        assert self._writer is not None
        decided = self._writer.factored
        groups = {
            name: found
            for name, m in layers.items()
            if isinstance(m, torch.nn.Linear)
            and (decided is None or name in decided)
            and (found := param_group(trainer, m.weight)) is not None
        }
        candidates = {name: layers[name] for name in groups}
        check_plain_sgd(trainer, candidates)
        if not candidates:
            warnings.warn(
                "TraceCallback(storage='factored') found no traced torch.nn.Linear layer updated by an optimizer; "
                "every layer is stored as lossless deltas.",
                stacklevel=2,
            )
        self._factor_lr = {name: group for name, (_, group) in groups.items()}
        self._recorder = FactorRecorder(candidates)
        self._checked = False

    def _take_factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """This step's factors of the factored layers; on the first step, choose those layers and check them."""
        assert self._recorder is not None and self._writer is not None
        rows = len(self._step_examples()[0])
        got = {
            name: step_factors(self._recorder.take(name), float(group["lr"]), rows)
            for name, group in self._factor_lr.items()
        }
        if self._writer.factored is None:  # a new trace: factor the layers where that is exact and smaller
            chosen = []
            for name, f in got.items():
                out_f, in_f = self._factor_shape(name)
                if isinstance(f, str):
                    log.info("TraceCallback: %s is stored as dense deltas: %s.", name, f)
                elif rows * (in_f + out_f) >= in_f * out_f:
                    log.info(
                        "TraceCallback: %s is stored as dense deltas: its factors, %d rows x (%d + %d) values per "
                        "step, would be larger than %d x %d.", name, rows, in_f, out_f, out_f, in_f,
                    )  # fmt: skip
                else:
                    chosen.append(name)
            self._writer.set_factored(chosen)
        factored = self._writer.factored or ()
        out = {}
        for name in factored:
            f = got[name]
            if isinstance(f, str):
                raise RuntimeError(
                    f"TraceCallback(storage='factored') cannot record step {self._next_step} of {name}: {f}. "
                    "Its earlier steps are committed; trace this model with storage='lossless'."
                )
            out[name] = f
        if not self._checked:
            self._check_and_narrow(out)
        return {name: (a.cpu().numpy(), g.cpu().numpy()) for name, (a, g) in out.items()}

    def _factor_shape(self, name: str) -> tuple[int, int]:
        i = self._names.index((name, "weight"))
        return tuple(self._params[i].shape)  # type: ignore[return-value]

    def _check_and_narrow(self, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Check the first step's factors against the actual change, then stop staging the factored weights."""
        actual = dict(zip(self._names, weight_deltas(self._params, self._prev), strict=True))
        for name, (a, g) in factors.items():
            check_step(name, a, g, actual[(name, "weight")], actual.get((name, "bias")))
        keep = [i for i, (layer, p) in enumerate(self._names) if not (p == "weight" and layer in factors)]
        self._names = [self._names[i] for i in keep]
        self._params = [self._params[i] for i in keep]
        self._prev = [self._prev[i] for i in keep]
        assert self._trainer is not None and self._recorder is not None
        self._stager = self._make_stager(self._trainer.lightning_module.device)
        self._recorder.keep_only(set(factors))
        self._factor_lr = {name: self._factor_lr[name] for name in factors}
        self._checked = True

    def _record(
        self,
        trainer: pl.Trainer,
        step: int,
        staged: Any,
        factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> StepRecord:
        index, label, ghost = self._step_examples()
        return StepRecord(
            global_step=step,
            epoch=trainer.current_epoch,
            batch_idx=self._batch_idx,
            lr=[float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups],
            index=index,
            ghost=ghost,
            label=label,
            deltas=staged,
            factors=factors,
        )

    def _step_examples(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Ids, labels and ghost flags of the step being recorded (all batches of its accumulation window).

        Merges the batches seen since the last step; calling it again before the next batch gives the same.
        """
        if len(self._pending) == 1:  # the usual case: one batch, one step
            self._last_examples, self._pending = self._pending[0], []
        elif self._pending:  # gradient accumulation: the step was produced by several batches
            parts = self._pending
            labels = [p[1] for p in parts]
            label = None if any(lab is None for lab in labels) else np.concatenate(labels)  # type: ignore[arg-type]
            self._last_examples = (np.concatenate([p[0] for p in parts]), label, np.concatenate([p[2] for p in parts]))
            self._pending = []
        # a second optimizer step within the same batch (manual optimization) was produced by the same examples
        return self._last_examples or (np.zeros(0, np.int64), None, np.zeros(0, bool))

    def _check_continuity(self, global_step: int) -> None:
        """On resume, the trace's last committed step must be the one right before this run's first."""
        if self._writer is None or self._records == 0:
            return
        last = int(self._writer.last_global_step())
        if last + 1 != global_step:
            raise RuntimeError(
                f"The trace at {self.dirpath} ends at global step {last}, but training continues at step "
                f"{global_step}; resume from the checkpoint that was saved with this trace."
            )

    def _close(self, *, raise_errors: bool) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._recorder is not None:
            self._recorder.remove()
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close(raise_errors=raise_errors)
        finally:
            run_id, records = self._run_id, (writer.committed if writer is not None else self._records)
            self._reset()  # a later fit with this callback starts afresh (or resumes from its checkpoint)
            self._run_id, self._records, self._resume = run_id, records, None


# ---------------------------------------------------------------------- helpers


def _default_chunk_steps(params: list[Tensor]) -> int:
    step_bytes = sum(t.numel() for t in params) * 4
    return int(max(1, min(256, _CHUNK_BYTES // max(1, step_bytes))))


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_spec(obj: Any) -> ClassSpec:
    """Import path and JSON-safe hyperparameters (``save_hyperparameters``) of a module or datamodule."""
    path = _class_path(obj)
    if "<locals>" in path:
        warnings.warn(
            f"{path} is defined inside a function, so tools cannot import it to rebuild the model from the trace; "
            "define it at module level.",
            stacklevel=3,
        )
    # LightningCLI adds private entries such as _class_path and _instantiator: not init arguments
    hparams = {k: v for k, v in dict(getattr(obj, "hparams", {}) or {}).items() if not k.startswith("_")}
    safe: dict[str, Any] = {}
    for key, value in hparams.items():
        try:
            safe[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            warnings.warn(
                f"Hyperparameter {key!r} of {type(obj).__name__} is not JSON-serializable and is stored as its repr; "
                "tools that rebuild the model from the trace alone will need it passed explicitly.",
                stacklevel=3,
            )
            safe[key] = repr(value)
    return ClassSpec(path, safe)


def _gather_rows(trainer: pl.Trainer, t: Tensor) -> Tensor:
    """Concatenate a per-rank tensor of varying length over all ranks (rank order)."""
    device = trainer.strategy.root_device
    t = t.to(device)
    sizes = trainer.strategy.all_gather(torch.tensor([t.shape[0]], device=device)).reshape(-1).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    gathered = trainer.strategy.all_gather(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)]).cpu()
