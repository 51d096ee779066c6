"""A trace's life cycle on disk: refuse what must not be touched, create, reopen to resume, cut back.

Every function here runs before or after the recording threads, never beside them.
On a local disk a trace is built beside its final path and renamed into place, so
a run killed at any moment leaves no trace or a complete one; on object storage
it is built in place, and readers refuse it until its ``initialized`` attribute is set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import MemoryStore

from lightning_tracetrain import functional as Fx
from lightning_tracetrain._version import __version__
from lightning_tracetrain.exceptions import TraceExistsError, TraceMismatchError, TraceWriteError
from lightning_tracetrain.trace import schema
from lightning_tracetrain.trace.chunks import trim
from lightning_tracetrain.trace.codecs import checksummed
from lightning_tracetrain.trace.schema import TraceSpec


def is_url(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``memory://...``: a location for fsspec rather than a local folder."""
    return "://" in path


def check_location(path: str, storage_options: dict[str, Any] | None) -> None:
    """``storage_options`` belong to URLs: given for a local path they are a mistake worth naming."""
    if storage_options and not is_url(path):
        raise ValueError(f"storage_options are for fsspec URLs such as s3://bucket/trace, not the local path {path}.")


def open_group(path: str, mode: str, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` for a local folder or an fsspec URL (``storage_options`` go to the filesystem,
    e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for S3; without them fsspec reads the usual
    environment, such as ``AWS_ENDPOINT_URL`` and ``AWS_ACCESS_KEY_ID``)."""
    check_location(path, storage_options)
    extra = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(store=path, mode=mode, zarr_format=3, **extra, **kwargs)


@dataclass(frozen=True)
class ResumeState:
    """What a Lightning checkpoint remembers about the trace it was written with.

    ``carry`` is ``storage="compact"``'s rounding error after the checkpoint's last step, so a
    resumed run keeps the error-feedback bound (one step's rounding) instead of restarting it.
    """

    run_id: str
    records: int
    carry: np.ndarray | None = None


def read_attrs(path: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Root attributes of the Zarr group at ``path``, or None when nothing is there."""
    try:
        return dict(open_group(path, "r", storage_options).attrs)
    except FileNotFoundError:
        if not is_url(path) and Path(path).is_dir() and any(Path(path).iterdir()):
            raise TraceExistsError(
                f"{path} exists and holds files that are not a trace; "
                "choose a new or empty directory for TraceCallback(dirpath=...)."
            ) from None
        return None


def check_new(path: str, spec: TraceSpec, *, overwrite: bool, storage_options: dict[str, Any] | None) -> None:
    """Refuse to start a new trace where one exists (unless ``overwrite``) or where other files are."""
    attrs = read_attrs(path, storage_options)
    if attrs is None:
        return
    if attrs.get("format") != schema.FORMAT:
        raise TraceExistsError(f"{path} is a Zarr group but not a lightning_tracetrain trace; choose another dirpath.")
    if not attrs.get("initialized") or overwrite or attrs.get("steps_committed") == 0:
        return  # a creation that was cut off, a trace the user asked to replace, or one with no step to lose
    existing = TraceSpec.from_attrs(attrs)
    if existing.fingerprint != spec.fingerprint:
        what = f"a trace of another model ({existing.describe()}); this run traces {spec.describe()}"
    else:
        what = f"a trace of an earlier run of this model ({attrs.get('steps_committed', 0)} steps)"
    raise TraceExistsError(
        f"{path} already holds {what}. Pass TraceCallback(overwrite=True) (--trace.overwrite true on the command "
        "line) to replace it, resume the earlier run with trainer.fit(..., ckpt_path=...), or choose another dirpath."
    )


def open_to_resume(
    path: str, spec: TraceSpec, resume: ResumeState, storage_options: dict[str, Any] | None
) -> tuple[zarr.Group, TraceSpec]:
    """Reopen the checkpoint's own trace and cut it back to the steps the checkpoint had seen.

    So a continued run neither repeats nor skips a step. Returns the group and the stored spec
    (which holds the factored layers chosen by the first run).
    """
    attrs = read_attrs(path, storage_options)
    if attrs is None or attrs.get("format") != schema.FORMAT or not attrs.get("initialized"):
        raise TraceMismatchError(
            f"The checkpoint being resumed was traced into run {resume.run_id}, but {path} holds no trace. "
            "Point TraceCallback(dirpath=...) at the trace the checkpoint was written with."
        )
    existing = TraceSpec.from_attrs(attrs)
    if attrs.get("run_id") != resume.run_id:
        raise TraceMismatchError(
            f"The checkpoint being resumed belongs to trace run {resume.run_id}, but {path} holds run "
            f"{attrs.get('run_id')} ({existing.describe()}). Point dirpath at the checkpoint's own trace."
        )
    committed = int(attrs.get("steps_committed", 0))
    if committed < resume.records:
        raise TraceMismatchError(
            f"The trace at {path} holds {committed} committed steps but the checkpoint was saved after "
            f"{resume.records}; the trace lost steps and cannot be continued without a gap."
        )
    if existing.fingerprint != spec.fingerprint:
        raise TraceMismatchError(
            f"The trace at {path} was recorded for {existing.describe()}, but this run traces "
            f"{spec.describe()}. Trace the same layers of the same model, or choose another dirpath."
        )
    if (existing.rank, existing.feedback) != (spec.rank, spec.feedback) and existing.mode == spec.mode:
        raise TraceMismatchError(
            f"The trace at {path} stores rank-{existing.rank} steps (feedback={existing.feedback}), but this run asks "
            f"for rank={spec.rank}, feedback={spec.feedback}; resume with the trace's settings or trace into another "
            "dirpath."
        )
    if existing.mode != spec.mode:
        raise TraceMismatchError(
            f"The trace at {path} stores {existing.mode!r} deltas, but this run asks for storage={spec.mode!r}; "
            f"resume with TraceCallback(storage={existing.mode!r}) or trace into another dirpath."
        )
    group = open_group(path, "r+", storage_options)
    truncate(group, resume.records)
    return group, existing


def create(
    path: str,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    compressor: zarr.abc.codec.BytesBytesCodec | None,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create a trace holding ``initial`` weights and no step, replacing what :func:`check_new` allowed."""
    if is_url(path):
        return _fill(open_group(path, "w", storage_options, attributes=_new_attrs(spec)), spec, initial, compressor)
    return publish(prepare(path, spec, initial, compressor), path)


def prepare(
    path: str,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    compressor: zarr.abc.codec.BytesBytesCodec | None,
) -> Path:
    """Build a new local trace in a hidden folder beside ``path``, for :func:`publish` to move into place.

    Nothing at ``path`` changes, so a recorder prepares its trace while the run starts up.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for debris in final.parent.glob(f".{final.name}.creating-*"):  # a creation killed midway (we hold the lease)
        shutil.rmtree(debris, ignore_errors=True)
    tmp = final.parent / f".{final.name}.creating-{uuid.uuid4().hex[:8]}"
    try:  # zarr builds it in memory (a third of the time it takes through the file system), then it is written
        built = _fill(zarr.open_group(MemoryStore(), mode="w", attributes=_new_attrs(spec)), spec, initial, compressor)
        contents = zarr_sync(_contents(built.store))
        for folder in sorted({(tmp / key).parent for key, _ in contents}):
            folder.mkdir(parents=True, exist_ok=True)
        for key, data in contents:
            (tmp / key).write_bytes(data)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TraceWriteError(f"Creating the trace at {path} failed ({exc}); nothing was left behind.") from exc
    return tmp


def publish(prepared: Path, path: str) -> zarr.Group:
    """Move a trace from :func:`prepare` to ``path``, replacing what :func:`check_new` allowed; open it."""
    final = Path(path)
    try:
        if final.exists():  # an empty directory, or a trace the user asked to overwrite
            shutil.rmtree(final)
        os.rename(prepared, final)
    except OSError as exc:
        shutil.rmtree(prepared, ignore_errors=True)
        raise TraceWriteError(f"Creating the trace at {path} failed ({exc}); nothing was left behind.") from exc
    return open_group(path, "r+")


def _new_attrs(spec: TraceSpec) -> dict[str, Any]:
    """The root attributes of a new trace of ``spec``, with no step committed yet."""
    return {
        "format": schema.FORMAT,
        "format_version": schema.FORMAT_VERSION,
        "initialized": False,  # set once the arrays and initial weights are in place
        "run_id": uuid.uuid4().hex,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "library_version": __version__,
        "steps_committed": 0,
        "examples_committed": 0,
        **spec.to_attrs(),
    }


async def _contents(store: MemoryStore) -> list[tuple[str, bytes]]:
    """Every key of ``store`` with its bytes."""
    prototype = default_buffer_prototype()
    keys = [key async for key in store.list()]
    buffers = await asyncio.gather(*(store.get(key, prototype) for key in keys))
    return [(key, buf.to_bytes()) for key, buf in zip(keys, buffers, strict=True) if buf is not None]


def _fill(
    group: zarr.Group,
    spec: TraceSpec,
    initial: dict[tuple[str, str], np.ndarray],
    compressor: zarr.abc.codec.BytesBytesCodec | None,
) -> zarr.Group:
    """Create the arrays of a new trace in ``group``, write the initial weights, then mark it initialized.

    Every array stores a crc32c checksum with each chunk (``checksummed``).
    """
    codecs = checksummed(compressor)
    shapes = {(lay.name, p): shape for lay in spec.layers for p, shape in lay.params.items()}
    for (layer, param), shape in shapes.items():
        init = group.create_array(schema.initial_path(layer, param), shape=shape, dtype="float32", compressors=codecs)
        init[...] = initial[(layer, param)]
    for layer, param in spec.dense_params():
        shape = shapes[(layer, param)]
        group.create_array(
            schema.delta_path(layer, param),
            shape=(0, *shape),
            chunks=(spec.chunk_steps, *shape),
            dtype="float32",
            fill_value=0.0,
            compressors=codecs,
        )
    for layer in spec.lowrank:
        shape = shapes[(layer, "weight")]
        for side, rows in zip(("out", "in"), Fx.matrix_shape(shape), strict=True):
            group.create_array(
                schema.lowrank_path(layer, side),
                shape=(0, rows, spec.rank),
                chunks=(spec.chunk_steps, rows, spec.rank),
                dtype="float32",
                fill_value=0.0,
                compressors=codecs,
            )
        group.create_array(
            schema.residual_path(layer), shape=(2, *shape), chunks=(1, *shape), dtype="float32", compressors=codecs
        )
    for layer in spec.factored:
        out_features, in_features = shapes[(layer, "weight")]
        for side, width in (("in", in_features), ("out", out_features)):
            group.create_array(
                schema.factor_path(layer, side),
                shape=(0, width),
                chunks=(schema.factor_chunk(width), width),
                dtype="float32",
                compressors=codecs,
            )
    for name, dtype in schema.STEP_ARRAYS.items():
        shape = (0, len(spec.lr_columns)) if name == "lr" else (0,)
        chunks = (schema.STEP_CHUNK, max(1, len(spec.lr_columns))) if name == "lr" else (schema.STEP_CHUNK,)
        group.create_array(schema.step_path(name), shape=shape, chunks=chunks, dtype=dtype, compressors=codecs)
    for name in ("index", "ghost"):
        group.create_array(
            schema.example_path(name),
            shape=(0,),
            chunks=(schema.EXAMPLE_CHUNK,),
            dtype=schema.EXAMPLE_ARRAYS[name],
            compressors=codecs,
        )
    group.update_attributes({"initialized": True})
    return group


def create_labels(group: zarr.Group, sample: np.ndarray | None, compressors: Any) -> zarr.Array:
    """``examples/label``, created with the first labelled rows: their dtype and width decide its own."""
    dtype = "int64" if sample is None or sample.dtype.kind in "iub" else "float32"
    width = () if sample is None else sample.shape[1:]
    return group.create_array(
        schema.example_path("label"),
        shape=(0, *width),
        chunks=(schema.EXAMPLE_CHUNK, *width),
        dtype=dtype,
        fill_value=-1,
        compressors=compressors,
    )


def truncate(group: zarr.Group, records: int) -> None:
    """Cut every step-axis and example-axis array back to ``records`` steps (dropping later rows).

    The counters are lowered first, in one write: a reader, or a crash, in between sees a trace whose
    arrays are longer than its committed steps, which is always valid.
    """
    examples = 0
    if records > 0:
        examples = int(group[schema.step_path("example_stop")][records - 1])
    counters: dict[str, Any] = {"steps_committed": records, "examples_committed": examples}
    if (group.attrs.get("residual") or {}).get("steps", 0) > records:
        counters["residual"] = None  # a low-rank residual of dropped steps: the resumed run writes its own
    group.update_attributes(counters)  # one write
    lengths = [
        (node, examples if schema.is_example_axis(name) else records)
        for name in TraceSpec.from_attrs(dict(group.attrs)).step_axis_paths()
        if (node := optional_array(group, name)) is not None
    ]
    zarr_sync(trim(lengths))


def optional_array(group: zarr.Group, path: str) -> zarr.Array | None:
    """The array at ``path``, or None when there is none (one metadata read, no listing)."""
    try:
        node = group[path]
    except KeyError:
        return None
    return node if isinstance(node, zarr.Array) else None
