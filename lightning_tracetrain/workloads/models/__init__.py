"""LightningModules of the paper's workloads (imported on first use, so digits never loads PyG)."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"Classifier": "classifier", "DigitsCNN": "cnn", "MotifGIN": "gin", "PpaGIN": "gin", "VGG16": "vgg"}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
