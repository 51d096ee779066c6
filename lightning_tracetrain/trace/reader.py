"""Reading a trace: initial weights, per-step deltas and what produced each step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.exceptions import TraceCorruptError, TraceFormatError, UnknownLayerError
from lightning_tracetrain.trace import integrity, schema
from lightning_tracetrain.trace.integrity import DECODE_ERRORS
from lightning_tracetrain.trace.schema import ClassSpec, LayerSpec, StorageMode, TraceSpec
from lightning_tracetrain.trace.store import check_location, open_group, optional_array
from lightning_tracetrain.trace.summary import stored_bytes, summary
from lightning_tracetrain.trace.tables import Examples, FactorRows, LowRankFactors, StepTable
from lightning_tracetrain.trace.verify import Verification, verify


class Trace:
    """A recorded training run, opened read-only.

    Only committed steps are visible: a trace that is still being written, or
    whose writer was killed, reads as the steps committed when it was opened.
    A ``Trace`` pickles as its path and that snapshot, so it can be handed to
    DataLoader worker processes.

    Example:
        >>> trace = Trace("runs/digits/trace")  # doctest: +SKIP
        >>> w = trace.initial("net.conv1")["weight"] + trace.deltas("net.conv1")["weight"].sum(0)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.storage_options = storage_options
        check_location(self.path, storage_options)  # a mistake in the arguments is not damage
        try:
            self._group = open_group(self.path, "r", storage_options)
        except FileNotFoundError:
            raise TraceFormatError(
                f"No trace at {self.path}: the path does not exist or holds no Zarr group."
            ) from None
        except DECODE_ERRORS as exc:
            raise TraceCorruptError(
                f"The trace at {self.path} is damaged: its metadata document (zarr.json) cannot be read "
                f"({type(exc).__name__}), so nothing in it can be located or trusted."
            ) from exc
        attrs = dict(self._group.attrs)
        if attrs.get("format") != schema.FORMAT:
            raise TraceFormatError(f"{self.path} is a Zarr group but not a lightning_tracetrain trace.")
        version = attrs.get("format_version")
        if version not in schema.READABLE_VERSIONS:
            raise TraceFormatError(
                f"{self.path} has trace format version {version}; this lightning_tracetrain reads versions "
                f"{', '.join(map(str, schema.READABLE_VERSIONS))}. Install the release that wrote it."
            )
        if not attrs.get("initialized"):
            raise TraceFormatError(f"{self.path} is an incomplete trace: its run stopped while creating it.")
        self._set(attrs)
        self._validate()

    def _set(self, attrs: dict[str, Any]) -> None:
        self.attrs = attrs
        self.spec = TraceSpec.from_attrs(attrs)
        self._layers = {lay.name: lay for lay in self.spec.layers}
        self._arrays: dict[str, Any] = {}  # opened arrays: their metadata is read once

    def _validate(self) -> None:
        """The committed counters must describe data that exists: else a TraceCorruptError naming the field."""
        integrity.check_counters(self)

    def _corrupt(self, what: str) -> None:
        raise TraceCorruptError(
            f"The trace at {self.path} is damaged: {what}. Its committed steps cannot be trusted; if a run is still "
            "writing it, open it again after the next commit."
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "storage_options": self.storage_options, "attrs": self.attrs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.storage_options = state["path"], state["storage_options"]
        self._group = open_group(self.path, "r", self.storage_options)
        self._set(state["attrs"])  # the same committed steps as the original, even if the run went on

    # ---- what was traced

    @property
    def layers(self) -> list[str]:
        """Qualified names of the traced layers, in module order."""
        return list(self._layers)

    def layer(self, name: str) -> LayerSpec:
        """Module type and parameter shapes of a traced layer."""
        try:
            return self._layers[name]
        except KeyError:
            raise UnknownLayerError(
                f"Layer {name!r} was not traced in {self.path}. Traced layers: {', '.join(self._layers)}."
            ) from None

    @property
    def num_steps(self) -> int:
        """Committed optimizer steps."""
        return int(self.attrs["steps_committed"])

    @property
    def run_id(self) -> str:
        return str(self.attrs["run_id"])

    @property
    def module(self) -> ClassSpec:
        """Import path and hyperparameters of the LightningModule that was trained."""
        return self.spec.module

    @property
    def datamodule(self) -> ClassSpec | None:
        """Import path and hyperparameters of the LightningDataModule, if the run used one."""
        return self.spec.datamodule

    @property
    def lr_columns(self) -> list[str]:
        """Names of the columns of ``steps.lr``: ``optimizer{i}/group{j}``."""
        return list(self.spec.lr_columns)

    @property
    def storage(self) -> StorageMode:
        """``"lossless"``, ``"compact"`` (deltas rounded to ``spec.keepbits`` mantissa bits), ``"factored"`` or
        ``"lowrank"``."""
        return self.spec.mode

    # ---- weights

    def initial(self, layer: str) -> dict[str, Tensor]:
        """The layer's parameters when tracing started."""
        return {p: self._read(schema.initial_path(layer, p)) for p in self.layer(layer).params}

    def deltas(self, layer: str, start: int = 0, stop: int | None = None) -> dict[str, Tensor]:
        """Per-step changes of the layer's parameters for steps ``[start, stop)``, stacked on axis 0.

        A factored layer's weight changes are rebuilt from its per-example factors, a low-rank
        layer's from its products (without the residual, :meth:`residual`).
        """
        deltas, factors = self.read_chunk(layer, start, stop)
        if isinstance(factors, LowRankFactors):
            return {"weight": Fx.lowrank_deltas(factors.p, factors.q, factors.shape), **deltas}
        if factors is None:
            return deltas
        return {"weight": Fx.factored_deltas(factors.inputs, factors.outputs, factors.counts.tolist()), **deltas}

    def read_chunk(
        self, layer: str, start: int = 0, stop: int | None = None
    ) -> tuple[dict[str, Tensor], FactorRows | LowRankFactors | None]:
        """What is stored for steps ``[start, stop)``: the dense deltas and, for a factored layer, its factor
        rows, for a low-rank layer its products' factors (its weight's deltas are then absent from the first;
        nothing is rebuilt)."""
        start, stop = self._bounds(start, stop)
        name = self.layer(layer).name
        deltas = {
            p: self._read(schema.delta_path(layer, p), slice(start, stop))
            for p in self.layer(layer).params
            if self.spec.has_deltas(name, p)
        }
        if self.spec.is_lowrank(name):
            p, q = (self._read(schema.lowrank_path(layer, s), slice(start, stop)) for s in ("out", "in"))
            return deltas, LowRankFactors(p, q, self.layer(layer).params["weight"])
        return deltas, (self.factors(layer, start, stop) if self.spec.is_factored(name) else None)

    def residual(self, layer: str) -> tuple[int, dict[str, Tensor]]:
        """``storage="lowrank"``: what the stored steps of a layer lack after the returned number of steps.

        The layer's weights after that many steps are ``initial + sum of deltas + residual`` exactly;
        the number is the last commit the run wrote the residual with (a checkpoint, or the end of
        the run), -1 when there is none (a run killed before). Other layers and storage modes lack
        nothing: ``(num_steps, {})``.
        """
        if not self.spec.is_lowrank(self.layer(layer).name):
            return self.num_steps, {}
        where = self.attrs.get("residual") or {}
        if not where or where["steps"] > self.num_steps:
            return -1, {}
        return int(where["steps"]), {"weight": self._read(schema.residual_path(layer), int(where["slot"]))}

    def factors(self, layer: str, start: int = 0, stop: int | None = None) -> FactorRows:
        """A factored layer's per-example factors for steps ``[start, stop)`` (``storage="factored"``)."""
        start, stop = self._bounds(start, stop)
        if not self.spec.is_factored(layer):
            factored = ", ".join(self.spec.factored) or "none"
            raise UnknownLayerError(
                f"Layer {layer!r} of {self.path} is stored as dense deltas, not per-example factors "
                f"(storage {str(self.storage)!r}; factored layers: {factored}). Use Trace.deltas({layer!r})."
            )
        steps = self.steps
        first = int(steps.example_start[start]) if stop > start else 0
        last = int(steps.example_stop[stop - 1]) if stop > start else 0
        return FactorRows(
            inputs=self._read(schema.factor_path(layer, "in"), slice(first, last)),
            outputs=self._read(schema.factor_path(layer, "out"), slice(first, last)),
            counts=torch.from_numpy(steps.rows[start:stop]),
            row_start=first,
        )

    def chunk_ranges(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """Steps ``[start, stop)`` split at the stored chunks' boundaries: the ranges that read whole chunks."""
        return integrity.split_rows(*self._bounds(start, stop), self.spec.chunk_steps)

    def iter_deltas(self, layer: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Like :meth:`deltas`, one stored chunk of steps at a time."""
        for first, last in self.chunk_ranges(start, stop):
            yield self.deltas(layer, first, last)

    def final(self, layer: str) -> dict[str, Tensor]:
        """The layer's parameters after the last committed step: initial + sum of deltas (+ the residual of a
        low-rank layer, when the run wrote it after its last step)."""
        weights = self._weights(layer, self.num_steps)
        steps, residual = self.residual(layer)
        if steps == self.num_steps:
            weights = {
                p: (w.double() + residual[p].double()).float() if p in residual else w for p, w in weights.items()
            }
        return weights

    def weights_at(self, step: int) -> dict[str, dict[str, Tensor]]:
        """Every traced layer's parameters after ``step`` recorded steps (0: the initial weights)."""
        if not 0 <= step <= self.num_steps:
            raise IndexError(f"step {step} is outside 0..{self.num_steps} (the trace's committed steps).")
        return {layer: self._weights(layer, step) for layer in self.layers}

    def _weights(self, layer: str, stop: int) -> dict[str, Tensor]:
        initial = self.initial(layer)
        return {
            p: Fx.accumulate(w0, (chunk[p] for chunk in self.iter_deltas(layer, 0, stop))) for p, w0 in initial.items()
        }

    # ---- what produced each step

    @cached_property
    def steps(self) -> StepTable:
        """Per-step metadata of the committed steps."""
        n = self.num_steps
        cols = {}
        for name, dtype in schema.STEP_ARRAYS.items():
            path = schema.step_path(name)
            cols[name] = self._read(path, slice(0, n)).numpy() if self._has(path) else np.zeros(n, dtype=dtype)
        stop = cols["example_stop"]
        start = np.concatenate([[0], stop[:-1]]).astype(np.int64)
        return StepTable(
            global_step=cols["global_step"],
            epoch=cols["epoch"],
            batch_idx=cols["batch_idx"],
            skipped=cols["skipped"],
            label=cols["label"],
            lr=cols["lr"],
            example_start=start,
            example_stop=stop,
            nonfinite=cols["nonfinite"],
        )

    @cached_property
    def examples(self) -> Examples:
        """Example rows of all committed steps; step ``t`` owns rows ``example_start[t]:example_stop[t]``."""
        n = int(self.steps.example_stop[-1]) if self.num_steps else 0
        rows = slice(0, n)
        has_labels = self._has(schema.example_path("label"))
        return Examples(
            index=self._read(schema.example_path("index"), rows).numpy(),
            label=self._read(schema.example_path("label"), rows).numpy() if has_labels else np.full(n, -1, np.int64),
            ghost=self._read(schema.example_path("ghost"), rows).numpy(),
        )

    def real_examples(self, step: int) -> np.ndarray:
        """Dataset ids of the real (non-ghost) examples of a step: the ones its gamma is split over."""
        ex = self.step_examples(step)
        return ex.index[~ex.ghost]

    def ghost_examples(self, step: int) -> np.ndarray:
        """Dataset ids of a step's ghost samples."""
        ex = self.step_examples(step)
        return ex.index[ex.ghost]

    def step_examples(self, step: int) -> Examples:
        """The examples that produced step ``step`` (all batches of its accumulation window)."""
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside 0..{self.num_steps - 1} (the trace's committed steps).")
        return self.examples[slice(int(self.steps.example_start[step]), int(self.steps.example_stop[step]))]

    # ---- size

    def nbytes(self, layers: Sequence[str] | None = None) -> dict[str, int]:
        """Stored and raw (float32) bytes of the deltas (or factors) of the committed steps, of all or some layers."""
        return stored_bytes(self, layers)

    def verify(self) -> Verification:
        """Read every committed chunk and metadata document: what is damaged, and the last intact step."""
        return verify(self.path, self.storage_options)

    def summary(self) -> str:
        """A short human-readable description: layers, steps, bytes."""
        return summary(self)

    def __repr__(self) -> str:
        return f"Trace({self.path!r}, layers={len(self.layers)}, num_steps={self.num_steps})"

    # ---- helpers

    def _bounds(self, start: int, stop: int | None) -> tuple[int, int]:
        n = self.num_steps
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"steps [{start}, {stop}) are outside the trace's {n} committed steps.")
        return start, stop

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            self._arrays[path] = integrity.open_array(self._group, path, self.path)
        return self._arrays[path]

    def _has(self, path: str) -> bool:
        """Whether the trace has the array (``examples/label`` and version-2 arrays may be absent)."""
        return path in self._arrays or optional_array(self._group, path) is not None

    def _read(self, path: str, rows: Any = Ellipsis) -> Tensor:
        """Rows of an array; a damaged chunk is a TraceCorruptError naming the array and the steps it holds."""
        values = integrity.read(self._array(path), path, rows, lambda a, b: self._rows(path, a, b), self.path)
        return torch.from_numpy(np.ascontiguousarray(values))

    def _rows(self, path: str, first: int, last: int) -> str:
        """What rows ``[first, last)`` of an array are, in steps."""
        if "/initial/" in path:
            return "the initial weights"
        if not schema.is_example_axis(path):
            return f"steps {first}..{last - 1}"
        table = self.__dict__.get("steps")  # known once the step table was read
        if table is None or not len(table.example_stop):
            return f"example rows {first}..{last - 1}"
        steps = np.searchsorted(table.example_stop, [first, max(first, last - 1)], side="right")
        return f"example rows {first}..{last - 1}, of steps {int(steps[0])}..{min(int(steps[1]), self.num_steps - 1)}"
