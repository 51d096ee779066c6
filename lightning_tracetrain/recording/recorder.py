"""TraceRecorder: records the optimizer steps of chosen layers into a trace, with no Lightning in sight.

Its life is ``start`` (check the target, or reopen the trace to resume), then
for every step ``add_examples`` (once per batch) and ``record`` (once per
optimizer step), ``commit`` before a checkpoint, and ``close``. A local trace is
built in a hidden folder while the run starts up and moved into place at the
first recorded step (which waits for it if need be), so a run that fails before it leaves nothing behind;
``storage="factored"`` creates its trace at the first step, once it knows its layers.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_tracetrain.exceptions import TraceBusyError
from lightning_tracetrain.functional import weight_deltas
from lightning_tracetrain.recording.classes import class_path
from lightning_tracetrain.recording.factored import FactoredSteps, param_group, to_numpy
from lightning_tracetrain.recording.layers import layer_parameters
from lightning_tracetrain.recording.lowrank import LowRankSteps, choose_lowrank
from lightning_tracetrain.recording.options import RecorderOptions, StepInfo, default_chunk_steps
from lightning_tracetrain.recording.space import step_bytes
from lightning_tracetrain.recording.staging import DeltaStager
from lightning_tracetrain.trace.background import in_background
from lightning_tracetrain.trace.codecs import make_compressor
from lightning_tracetrain.trace.lease import Lease
from lightning_tracetrain.trace.records import PendingExamples, StepRecord
from lightning_tracetrain.trace.schema import ClassSpec, LayerSpec, StorageMode, TraceSpec
from lightning_tracetrain.trace.store import (
    ResumeState,
    check_new,
    create,
    is_url,
    open_to_resume,
    prepare,
    publish,
)
from lightning_tracetrain.trace.writer import TraceWriter

Param = tuple[str, str]  # (layer, parameter)


class TraceRecorder:
    """Records every optimizer step of ``layers`` into the trace at ``options.dirpath``.

    Example:
        >>> recorder = TraceRecorder(RecorderOptions("runs/trace"))  # doctest: +SKIP
        >>> recorder.start(select_layers(model), module=ClassSpec("my.Model"), optimizers=[opt])  # doctest: +SKIP
        >>> recorder.add_examples(index, labels, ghost); opt.step(); recorder.record(StepInfo(0, 0, 0, [0.1]))
        >>> recorder.close()  # doctest: +SKIP
    """

    def __init__(self, options: RecorderOptions) -> None:
        self.options = options
        self._writer: TraceWriter | None = None
        self._spec: TraceSpec | None = None
        self._params: dict[Param, Tensor] = {}
        self._prev: dict[Param, Tensor] = {}
        self._initial: dict[Param, np.ndarray] | None = None
        self._staged: list[Param] = []  # the parameters stored as deltas (the factored weights are not)
        self._after: list[Tensor] = []  # their tensors, and ...
        self._before: list[Tensor] = []  # ... float32 copies from before the step, in the same order
        self._stager: DeltaStager | None = None
        self._device = torch.device("cpu")
        self._factored: FactoredSteps | None = None
        self._lowrank: LowRankSteps | None = None
        self._resume: ResumeState | None = None
        self._lease: Lease | None = None
        self._warned_nonfinite = False
        self._examples = PendingExamples()
        self._prepared: Future[Path] | None = None  # a new local trace being built (see trace.store.prepare)

    # ------------------------------------------------------------------ life cycle

    def start(
        self,
        layers: Mapping[str, nn.Module],
        *,
        module: ClassSpec,
        optimizers: Sequence[torch.optim.Optimizer],
        datamodule: ClassSpec | None = None,
        resume: ResumeState | None = None,
    ) -> None:
        """Check the target (or reopen the trace to resume) and keep a copy of the layers' weights."""
        opts = self.options
        named = {(name, p): t for name, m in layers.items() for p, t in layer_parameters(m).items()}
        mode = StorageMode(opts.storage)
        lowrank = (
            ()
            if mode != StorageMode.lowrank
            else choose_lowrank({name: m.weight.shape for name, m in layers.items()}, opts.rank)
        )
        spec = TraceSpec(
            layers=tuple(
                LayerSpec(name, class_path(m), {p: tuple(t.shape) for p, t in layer_parameters(m).items()})
                for name, m in layers.items()
            ),
            module=module,
            datamodule=datamodule,
            lr_columns=tuple(
                f"optimizer{i}/group{j}" for i, o in enumerate(optimizers) for j in range(len(o.param_groups))
            ),
            chunk_steps=opts.chunk_steps or default_chunk_steps(sum(step_bytes(layers, mode, opts.rank).values())),
            compressor=None if (c := make_compressor(opts.compressor, mode)) is None else c.to_dict(),
            mode=mode,
            keepbits=opts.keepbits if mode == StorageMode.compact else None,
            rank=opts.rank if mode == StorageMode.lowrank else None,
            feedback=opts.feedback if mode == StorageMode.lowrank else False,
            lowrank=lowrank,
        )
        self._params = named
        self._prev = {k: t.detach().float().clone() for k, t in named.items()}
        self._device = next(iter(named.values())).device
        self._lease = Lease(opts.dirpath, opts.storage_options)
        self._lease.acquire()  # before anything is read or replaced: one writer per trace
        try:
            if resume is not None:
                group, spec = open_to_resume(opts.dirpath, spec, resume, opts.storage_options)
                self._open(group, start=resume.records, carry=resume.carry)
            else:
                check_new(opts.dirpath, spec, overwrite=opts.overwrite, storage_options=opts.storage_options)
                self._initial = {k: t.cpu().numpy().copy() for k, t in self._prev.items()}  # _prev changes
        except BaseException:
            self._lease.release()
            raise
        self._spec = spec
        self._stage(spec.dense_params() if mode == StorageMode.lowrank else list(named))
        if spec.lowrank:
            assert spec.rank is not None
            self._lowrank = LowRankSteps(
                {n: self._params[(n, "weight")] for n in spec.lowrank},
                {n: self._prev[(n, "weight")] for n in spec.lowrank},
                spec.rank,
                spec.feedback,
                carry=None if resume is None else resume.carry,
            )
        if mode == StorageMode.factored:
            linear = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
            groups = {n: g[1] for n, m in linear.items() if (g := param_group(optimizers, m.weight)) is not None}
            if not groups:
                warnings.warn(
                    "TraceCallback(storage='factored') found no traced torch.nn.Linear layer updated by an "
                    "optimizer; every layer is stored as lossless deltas.",
                    stacklevel=2,
                )
            self._factored = FactoredSteps(
                {n: linear[n] for n in groups}, groups, spec.factored if resume is not None else None
            )
        else:
            self._stager = self._make_stager()
        if resume is None and mode != StorageMode.factored and not is_url(opts.dirpath):
            compressor = make_compressor(opts.compressor, mode)
            self._prepared = in_background(prepare, opts.dirpath, spec, self._initial, compressor)

    def close(self, *, raise_errors: bool = True) -> None:
        """Commit what is queued and stop the writer; with ``raise_errors`` a write failure is raised."""
        if self._factored is not None:
            self._factored.remove()
        writer, self._writer = self._writer, None
        try:
            if (prepared := self._prepared) is not None:  # no step was recorded: leave nothing behind
                self._prepared = None
                if prepared.exception() is None:
                    shutil.rmtree(prepared.result(), ignore_errors=True)
            if writer is not None:
                try:
                    writer.close(raise_errors=raise_errors, residual=self._residuals())
                finally:
                    self._resume = ResumeState(writer.run_id, writer.committed, self._carry(writer))
                self._warn_nonfinite(writer)  # a run that diverged in its last steps
        finally:
            if self._lease is not None:
                self._lease.release()

    # ------------------------------------------------------------------ steps

    def add_examples(self, index: np.ndarray, label: np.ndarray | None, ghost: np.ndarray) -> None:
        """The dataset ids, labels (or None) and ghost flags of a batch that the next step trains on."""
        self._examples.add(index, label, ghost)

    def record(self, info: StepInfo) -> None:
        """After an optimizer step: stage the layers' changes and queue the step for the writer."""
        self._check_run()
        index, label, ghost = self._examples.take()
        factors = None
        if self._factored is not None:
            taken = self._factored.take(len(index), info.global_step)
            if self._stager is None:  # the first step of this fit: check the factors, then stage the rest
                actual = dict(zip(self._staged, weight_deltas(self._after, self._before), strict=True))
                self._factored.check(taken, actual)
                assert self._spec is not None and self._factored.chosen is not None
                self._spec = self._spec.with_factored(self._factored.chosen)
                self._stage(self._spec.dense_params())
                self._stager = self._make_stager()
            factors = to_numpy(taken)
        writer = self._writer or self._create()
        assert self._stager is not None
        staged = self._stager.stage(self._after, self._before, () if self._lowrank is None else self._lowrank.step())
        writer.put(StepRecord(**vars(info), index=index, ghost=ghost, label=label, deltas=staged, factors=factors))
        with torch.no_grad():  # after the put: an inline writer computes the deltas when it takes the step
            torch._foreach_copy_(self._before, self._after)

    def record_skipped(self, info: StepInfo) -> None:
        """A step the training loop counted without changing the weights (AMP found inf/nan): a zero delta."""
        if self._factored is not None and self._factored.chosen is None:
            raise RuntimeError(
                f"TraceCallback(storage='factored') got a skipped step ({info.global_step}) before its first step: "
                "its layers are chosen on a real step. Trace this run with storage='lossless'."
            )
        self._check_run()
        index, label, ghost = self._examples.take()
        writer = self._writer or self._create()
        writer.put(StepRecord(**vars(info), index=index, ghost=ghost, label=label, deltas=None))

    def commit(self) -> ResumeState | None:
        """Commit every queued step; returns what a checkpoint needs to resume this trace (None: no step yet)."""
        if self._writer is None:
            return self._resume
        self._writer.flush(residual=self._residuals())
        return ResumeState(self._writer.run_id, self._writer.committed, self._carry(self._writer))

    def note_checkpoint(self, path: str, global_step: int) -> None:
        """The run saved a checkpoint holding its first ``global_step`` steps at ``path`` (kept in the trace)."""
        if self._writer is not None:
            self._writer.note_checkpoint(path, global_step)

    def last_global_step(self) -> int | None:
        """Global step of the last committed step of a resumed trace (None for a new trace)."""
        return None if self._writer is None or self._writer.committed == 0 else self._writer.last_global_step()

    # ------------------------------------------------------------------ helpers

    def _check_run(self) -> None:
        """Stop when another run took the trace over; warn once when a step made the weights non-finite."""
        if self._writer is not None:
            self._warn_nonfinite(self._writer)
        if self._lease is not None and self._lease.lost:
            raise TraceBusyError(
                f"Another run took over the lease of the trace at {self.options.dirpath} (this run's heartbeat was "
                "late, so it looked gone); to keep both runs' steps apart this run stops recording. Its committed "
                "steps are in the trace; resume from the last checkpoint into another dirpath."
            )

    def _warn_nonfinite(self, writer: TraceWriter) -> None:
        if writer.first_nonfinite is not None and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"Global step {writer.first_nonfinite} changed the weights by NaN or infinity: training has diverged. "
                "The trace records it (Trace.steps.nonfinite), and explanations of this run will say so.",
                stacklevel=5,
            )

    def _residuals(self) -> dict[str, np.ndarray] | None:
        """``storage="lowrank"``: each low-rank weight's residual as of the last queued step (None otherwise)."""
        return None if self._lowrank is None else self._lowrank.residuals()

    def _carry(self, writer: TraceWriter) -> np.ndarray | None:
        """What a checkpoint keeps to continue the trace's error bookkeeping (compact's carry, lowrank's residual)."""
        return self._lowrank.carry() if self._lowrank is not None else writer.carry

    def _stage(self, keys: list[Param]) -> None:
        """Store these parameters as deltas from now on (``_prev`` keeps every parameter's last value)."""
        self._staged = keys
        self._after = [self._params[k] for k in keys]
        self._before = [self._prev[k] for k in keys]

    def _make_stager(self) -> DeltaStager:
        """Staging buffers for the staged deltas, enough for every step that may wait for the writer."""
        shapes = [self._params[k].shape for k in self._staged]
        if self._lowrank is not None:
            shapes += self._lowrank.shapes()
        return DeltaStager(shapes, self._device, self.options.max_pending_steps + 2, direct=self._inline)

    @property
    def _inline(self) -> bool:
        """Whether the writer works on the training thread: CPU training into a local trace (see TraceWriter)."""
        return self._device.type == "cpu" and not is_url(self.options.dirpath)

    def _create(self) -> TraceWriter:
        assert self._spec is not None and self._initial is not None, "start() comes before the first step"
        opts = self.options
        if (prepared := self._prepared) is not None:
            self._prepared = None
            group = publish(prepared.result(), opts.dirpath)  # the first step waits for the build, if need be
        else:
            compressor = make_compressor(opts.compressor, self._spec.mode)
            group = create(opts.dirpath, self._spec, self._initial, compressor, opts.storage_options)
        self._initial = None
        writer = self._open(group, start=0)
        if self._lease is not None:
            self._lease.set_run(writer.run_id)
        return writer

    def _open(self, group: Any, start: int, carry: np.ndarray | None = None) -> TraceWriter:
        opts = self.options
        self._writer = TraceWriter(
            group,
            start=start,
            max_pending=opts.max_pending_steps,
            commit_every_s=opts.commit_every_s,
            path=opts.dirpath,
            carry=carry,
            inline=self._inline,
        )
        return self._writer
