"""The trace's on-disk layout, in one place (documented in docs/trace-format.md).

A trace is a Zarr v3 group. Arrays with a leading step axis hold one row per
recorded optimizer step; readers trust only the first ``steps_committed`` rows
(an attribute written after the data), so a killed run never exposes a
half-written step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

FORMAT = "lightning_tracetrain.trace"
FORMAT_VERSION = 2  # 2: a crc32c checksum on every chunk, steps/nonfinite; 1: neither
READABLE_VERSIONS = (1, 2)

#: Per-step arrays under ``steps/`` and their dtypes (``lr`` is 2-d: steps x param groups).
STEP_ARRAYS: dict[str, str] = {
    "global_step": "int64",
    "epoch": "int64",
    "batch_idx": "int64",
    "skipped": "bool",
    "example_stop": "int64",
    "label": "int64",
    "lr": "float64",
    "nonfinite": "bool",  # the step changed a weight by NaN or infinity (version 2)
}
#: Step arrays a version-1 trace does not have.
NEW_IN_VERSION_2 = ("nonfinite",)
#: Per-example arrays under ``examples/`` (ragged over steps, split by ``steps/example_stop``).
EXAMPLE_ARRAYS: dict[str, str] = {"index": "int64", "ghost": "bool", "label": "<from the data>"}

STEP_CHUNK = 4096
EXAMPLE_CHUNK = 65536


class StorageMode(enum.StrEnum):
    """How a trace stores each step's weight change (``TraceCallback(storage=...)``)."""

    lossless = "lossless"  # float32 deltas, exactly
    compact = "compact"  # deltas rounded to ``keepbits`` mantissa bits, with error feedback
    factored = "factored"  # plain SGD: Linear layers as per-example factors where smaller, the rest lossless
    lowrank = "lowrank"  # weights as rank-r products P_t Q_t^T where smaller, the rest lossless; residual kept


def delta_path(layer: str, param: str) -> str:
    """Array of a layer parameter's per-step changes, shape ``(steps, *param.shape)``."""
    return f"layers/{layer}/delta/{param}"


def factor_path(layer: str, side: str) -> str:
    """``storage="factored"``: a layer's per-example factors on the ``examples`` axis.

    ``side="in"``: the layer's input row of each example, ``(examples, in_features)``; ``side="out"``:
    ``-lr`` times the loss gradient of the layer's output row, ``(examples, out_features)``. A step's
    weight change is the sum of ``out_r in_r^T`` over its rows.
    """
    return f"layers/{layer}/factor/{side}"


def lowrank_path(layer: str, side: str) -> str:
    """``storage="lowrank"``: a layer's per-step factors on the step axis.

    ``side="out"``: ``P_t``, ``(steps, out_channels, rank)``; ``side="in"``: ``Q_t``,
    ``(steps, in_channels * kernel size, rank)``. Step ``t`` changed the weight, viewed as
    ``(out, in * kernel)``, by ``P_t Q_t^T`` (up to the residual, :func:`residual_path`).
    """
    return f"layers/{layer}/lowrank/{side}"


def residual_path(layer: str) -> str:
    """``storage="lowrank"``: what the stored products of a layer's weight lack, ``(2, *weight.shape)``.

    The weight after ``n`` steps is ``initial + sum_t P_t Q_t^T + residual``; two slots alternate
    and the root attribute ``residual`` (``{"steps": n, "slot": k}``) names the valid one, so a
    crash while one is written leaves the other.
    """
    return f"layers/{layer}/residual/weight"


def factor_chunk(width: int) -> int:
    """Rows per chunk of a factor array: about 2 MiB of float32."""
    return max(256, 2**21 // (4 * max(1, width)))


def initial_path(layer: str, param: str) -> str:
    """Array of a layer parameter's value when tracing started."""
    return f"layers/{layer}/initial/{param}"


def step_path(name: str) -> str:
    return f"steps/{name}"


def example_path(name: str) -> str:
    return f"examples/{name}"


def is_example_axis(path: str) -> bool:
    """Arrays with one row per committed example row (split over steps by ``steps/example_stop``)."""
    return path.startswith("examples/") or "/factor/" in path


@dataclass(frozen=True)
class ClassSpec:
    """An importable class and the keyword arguments to rebuild it (LightningCLI's shape)."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": self.init_args}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ClassSpec | None:
        return None if d is None else cls(d["class_path"], dict(d.get("init_args") or {}))


@dataclass(frozen=True)
class LayerSpec:
    """A traced layer: its module type and the shapes of its stored parameters."""

    name: str
    module_type: str
    params: dict[str, tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.module_type, "params": {k: list(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> LayerSpec:
        return cls(name, d["type"], {k: tuple(v) for k, v in d["params"].items()})


@dataclass(frozen=True)
class TraceSpec:
    """What a trace records about the run that made it; written once at creation."""

    layers: tuple[LayerSpec, ...]
    module: ClassSpec
    datamodule: ClassSpec | None
    lr_columns: tuple[str, ...]
    chunk_steps: int
    compressor: dict[str, Any] | None
    mode: StorageMode = StorageMode.lossless
    keepbits: int | None = None  # compact: mantissa bits kept
    factored: tuple[str, ...] = ()  # factored: the layers whose weight is stored as per-example factors
    rank: int | None = None  # lowrank: the rank of each step's product
    feedback: bool = False  # lowrank: each step's residual is carried into the next step (error feedback)
    lowrank: tuple[str, ...] = ()  # lowrank: the layers whose weight is stored as rank-r products

    def is_factored(self, layer: str) -> bool:
        return layer in self.factored

    def is_lowrank(self, layer: str) -> bool:
        return layer in self.lowrank

    def with_factored(self, layers: tuple[str, ...]) -> TraceSpec:
        return replace(self, factored=tuple(layers))

    def with_lowrank(self, layers: tuple[str, ...]) -> TraceSpec:
        return replace(self, lowrank=tuple(layers))

    def has_deltas(self, layer: str, param: str) -> bool:
        """Whether a parameter is stored as per-step deltas (a factored or low-rank weight is stored as factors)."""
        return not (param == "weight" and (self.is_factored(layer) or self.is_lowrank(layer)))

    def dense_params(self) -> list[tuple[str, str]]:
        """``(layer, param)`` of every parameter stored as per-step deltas, in layer order."""
        return [(lay.name, p) for lay in self.layers for p in lay.params if self.has_deltas(lay.name, p)]

    def step_value_paths(self) -> list[str]:
        """The arrays holding one row of values per step, in the order a staged step concatenates them:
        dense deltas, then each low-rank layer's ``P_t`` and ``Q_t``."""
        return [
            *(delta_path(layer, p) for layer, p in self.dense_params()),
            *(lowrank_path(layer, side) for layer in self.lowrank for side in ("out", "in")),
        ]

    def step_axis_paths(self) -> list[str]:
        """Every array with one row per step or per example row (``examples/label`` may not exist yet)."""
        return [
            *self.step_value_paths(),
            *(factor_path(layer, side) for layer in self.factored for side in ("in", "out")),
            *(step_path(name) for name in STEP_ARRAYS),
            *(example_path(name) for name in EXAMPLE_ARRAYS),
        ]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What must agree between a trace and a model for them to belong together."""
        return {"module": self.module.class_path, "layers": {lay.name: lay.to_dict() for lay in self.layers}}

    def describe(self) -> str:
        """``module.Class with layers a, b`` for error messages."""
        return f"{self.module.class_path} with layers {', '.join(lay.name for lay in self.layers)}"

    def to_attrs(self) -> dict[str, Any]:
        return {
            "layers": {lay.name: lay.to_dict() for lay in self.layers},
            "module": self.module.to_dict(),
            "datamodule": None if self.datamodule is None else self.datamodule.to_dict(),
            "lr_columns": list(self.lr_columns),
            "storage": {
                "mode": str(self.mode),
                "dtype": "float32",
                "chunk_steps": self.chunk_steps,
                "compressor": self.compressor,
                **({"keepbits": self.keepbits} if self.mode == StorageMode.compact else {}),
                **({"factored": list(self.factored)} if self.mode == StorageMode.factored else {}),
                **(
                    {"rank": self.rank, "feedback": self.feedback, "lowrank": list(self.lowrank)}
                    if self.mode == StorageMode.lowrank
                    else {}
                ),
            },
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TraceSpec:
        storage = attrs["storage"]
        return cls(
            layers=tuple(LayerSpec.from_dict(n, d) for n, d in attrs["layers"].items()),
            module=ClassSpec.from_dict(attrs["module"]),  # type: ignore[arg-type]
            datamodule=ClassSpec.from_dict(attrs.get("datamodule")),
            lr_columns=tuple(attrs.get("lr_columns", ())),
            chunk_steps=int(storage["chunk_steps"]),
            compressor=storage.get("compressor"),
            mode=StorageMode(storage.get("mode", "lossless")),
            keepbits=storage.get("keepbits"),
            factored=tuple(storage.get("factored") or ()),
            rank=storage.get("rank"),
            feedback=bool(storage.get("feedback", False)),
            lowrank=tuple(storage.get("lowrank") or ()),
        )
