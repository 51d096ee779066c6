"""One place for the Trainer settings of the library's own short jobs (explanation passes, decoders, benchmarks)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl


def quiet_trainer(*, progress_bar: bool = False, **kwargs: Any) -> pl.Trainer:
    """A Trainer without logger, checkpoints, model summary or sanity checks (and a progress bar only if asked).

    Keyword arguments override these settings or add others (``max_epochs``, ``accelerator``, ...).
    """
    settings: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": progress_bar,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    with quiet_logs():
        return pl.Trainer(**{**settings, **kwargs})


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Lightning's INFO lines (devices found, tips) muted: the library's short jobs report for themselves."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
