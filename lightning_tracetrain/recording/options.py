"""What a :class:`~lightning_tracetrain.recording.recorder.TraceRecorder` is told: where and how to write its
trace, and what the training loop knows about each step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_tracetrain.trace.codecs import Compressor
from lightning_tracetrain.trace.schema import StorageMode

_CHUNK_BYTES = 32 * 2**20  # steps are buffered until a chunk of about this many raw bytes is full


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


def default_chunk_steps(nbytes: int) -> int:
    """Steps per chunk for steps of ``nbytes`` raw bytes: about 32 MiB a chunk, 1 to 256 steps."""
    return int(max(1, min(256, _CHUNK_BYTES // max(1, nbytes))))
