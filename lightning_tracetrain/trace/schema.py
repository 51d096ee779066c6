"""The trace's on-disk layout, in one place (documented in docs/trace-format.md).

A trace is a Zarr v3 group. Arrays with a leading step axis hold one row per
recorded optimizer step; readers trust only the first ``steps_committed`` rows
(an attribute written after the data), so a killed run never exposes a
half-written step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zarr

FORMAT = "lightning_tracetrain.trace"
FORMAT_VERSION = 1

#: Per-step arrays under ``steps/`` and their dtypes (``lr`` is 2-d: steps x param groups).
STEP_ARRAYS: dict[str, str] = {
    "global_step": "int64",
    "epoch": "int64",
    "batch_idx": "int64",
    "skipped": "bool",
    "example_stop": "int64",
    "label": "int64",
    "lr": "float64",
}
#: Per-example arrays under ``examples/`` (ragged over steps, split by ``steps/example_stop``).
EXAMPLE_ARRAYS: dict[str, str] = {"index": "int64", "ghost": "bool", "label": "<from the data>"}

STEP_CHUNK = 4096
EXAMPLE_CHUNK = 65536


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
    mode: str = "lossless"  # or "compact": deltas rounded to keepbits mantissa bits, with error feedback
    keepbits: int | None = None
    # "factored": the layers whose weight is stored as per-example factors; None until the first step decides
    factored: tuple[str, ...] | None = None

    def is_factored(self, layer: str) -> bool:
        return self.factored is not None and layer in self.factored

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
                "mode": self.mode,
                "dtype": "float32",
                "chunk_steps": self.chunk_steps,
                "compressor": self.compressor,
                **({"keepbits": self.keepbits} if self.mode == "compact" else {}),
                **({"factored": list(self.factored)} if self.factored is not None else {}),
            },
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TraceSpec:
        return cls(
            layers=tuple(LayerSpec.from_dict(n, d) for n, d in attrs["layers"].items()),
            module=ClassSpec.from_dict(attrs["module"]),  # type: ignore[arg-type]
            datamodule=ClassSpec.from_dict(attrs.get("datamodule")),
            lr_columns=tuple(attrs.get("lr_columns", ())),
            chunk_steps=int(attrs["storage"]["chunk_steps"]),
            compressor=attrs["storage"].get("compressor"),
            mode=attrs["storage"].get("mode", "lossless"),
            keepbits=attrs["storage"].get("keepbits"),
            factored=None if (f := attrs["storage"].get("factored")) is None else tuple(f),
        )


def is_url(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``memory://...``: a location for fsspec rather than a local folder."""
    return "://" in path


def open_group(path: str, mode: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` for a local folder or an fsspec URL (``storage_options`` go to the filesystem,
    e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3; without them fsspec reads the usual
    environment, such as ``AWS_ENDPOINT_URL`` and ``AWS_ACCESS_KEY_ID``)."""
    if storage_options and not is_url(path):
        raise ValueError(f"storage_options are for fsspec URLs such as s3://bucket/trace, not the local path {path}.")
    extra = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(store=path, mode=mode, **extra, **kwargs)
