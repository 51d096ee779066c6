"""TraceRecorder: records the optimizer steps of chosen layers into a trace, with no Lightning in sight.

Its life is ``start`` (check the target, or reopen the trace to resume), then
for every step ``add_examples`` (once per batch) and ``record`` (once per
optimizer step), ``commit`` before a checkpoint, and ``close``. The trace is
created at the first recorded step, so a run that fails before it leaves
nothing behind, and ``storage="factored"`` knows its layers when it creates it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from lightning_tracetrain.recording.space import step_bytes
from lightning_tracetrain.recording.staging import DeltaStager
from lightning_tracetrain.trace.codecs import Compressor, make_compressor
from lightning_tracetrain.trace.lease import Lease
from lightning_tracetrain.trace.records import PendingExamples, StepRecord
from lightning_tracetrain.trace.schema import ClassSpec, LayerSpec, StorageMode, TraceSpec
from lightning_tracetrain.trace.store import ResumeState, check_new, create, open_to_resume
from lightning_tracetrain.trace.writer import TraceWriter

_CHUNK_BYTES = 32 * 2**20  # steps are buffered until a chunk of about this many raw bytes is full

Param = tuple[str, str]  # (layer, parameter)


@dataclass(frozen=True)
class RecorderOptions:
    """Where and how a trace is written (the ``TraceCallback`` arguments, validated there)."""

    dirpath: str
    storage: StorageMode = StorageMode.lossless
    keepbits: int = 4
    rank: int = 8
    feedback: bool = False
    compressor: Compressor = "auto"
    chunk_steps: int | None = None
    overwrite: bool = False
    max_pending_steps: int = 8
    commit_every_s: float = 30.0
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class StepInfo:
    """What the training loop knows about an optimizer step."""

    global_step: int
    epoch: int
    batch_idx: int
    lr: Sequence[float]


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
            chunk_steps=opts.chunk_steps or _default_chunk_steps(sum(step_bytes(layers, mode, opts.rank).values())),
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
                self._initial = {k: t.cpu().numpy() for k, t in self._prev.items()}
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

    def close(self, *, raise_errors: bool = True) -> None:
        """Commit what is queued and stop the writer; with ``raise_errors`` a write failure is raised."""
        if self._factored is not None:
            self._factored.remove()
        writer, self._writer = self._writer, None
        try:
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
        with torch.no_grad():
            torch._foreach_copy_(self._before, self._after)
        writer.put(StepRecord(**vars(info), index=index, ghost=ghost, label=label, deltas=staged, factors=factors))

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
        return DeltaStager(shapes, self._device, self.options.max_pending_steps + 2)

    def _create(self) -> TraceWriter:
        assert self._spec is not None and self._initial is not None, "start() comes before the first step"
        opts = self.options
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
        )
        return self._writer


def _default_chunk_steps(nbytes: int) -> int:
    return int(max(1, min(256, _CHUNK_BYTES // max(1, nbytes))))
