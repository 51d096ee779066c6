"""Named exceptions: every message says what went wrong and what to do about it."""

from __future__ import annotations


class TraceTrainError(Exception):
    """Base class of every error raised by lightning_tracetrain."""


class UnknownLayerError(TraceTrainError, KeyError):
    """A layer name or pattern matched no traceable (or traced) layer."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class MissingIndexError(TraceTrainError, KeyError):
    """A training batch carries no dataset ids (`index`)."""

    def __str__(self) -> str:
        return str(self.args[0])


class TraceExistsError(TraceTrainError, FileExistsError):
    """The target directory already holds a trace that this run must not overwrite."""


class TraceMismatchError(TraceTrainError, ValueError):
    """A trace and a model, checkpoint or resume state do not belong together."""


class TraceFormatError(TraceTrainError, ValueError):
    """A path is not a trace, or a trace of a format version this code cannot read."""


class TraceCorruptError(TraceFormatError):
    """A trace's data or counters are damaged or impossible; the message names what and what still can be used."""


class TraceDivergedError(TraceTrainError, ValueError):
    """The traced run diverged (non-finite weights): its explanations would mean nothing."""


class TraceBusyError(TraceTrainError, RuntimeError):
    """Another live run holds the trace's lease: two writers would destroy each other's steps."""


class TraceWriteError(TraceTrainError, OSError):
    """Writing the trace failed (full disk, lost permissions); committed steps stay readable."""


class UntrustedCodeError(TraceTrainError, PermissionError):
    """A trace or checkpoint asks to import or unpickle code that the user has not said to trust."""


class UnknownConfigError(TraceTrainError, FileNotFoundError):
    """A workload config (``configs/NAME.yaml`` or a path) that does not exist; the message lists the configs."""
