"""What a trace records about the classes that made it: import paths and JSON-safe hyperparameters.

Tools rebuild the model (and datamodule) from these, after the user trusts them
(``explain --trust``); nothing here is ever imported by reading a trace.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from lightning_tracetrain.trace.schema import ClassSpec


def class_path(obj: Any) -> str:
    """``module.QualName`` of a class or of an object's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def class_spec(obj: Any) -> ClassSpec:
    """Import path and JSON-safe hyperparameters (``save_hyperparameters``) of a module or datamodule."""
    path = class_path(obj)
    where = "inside a function" if "<locals>" in path else "in the script being run (__main__)"
    if "<locals>" in path or path.startswith("__main__."):
        warnings.warn(
            f"{path} is defined {where}, so tools cannot import it to rebuild the model from the trace "
            "(python -m lightning_tracetrain explain); move it into a module at its top level and import it.",
            stacklevel=3,
        )
    # LightningCLI adds private entries such as _class_path and _instantiator: not init arguments
    hparams = {k: v for k, v in dict(getattr(obj, "hparams", {}) or {}).items() if not k.startswith("_")}
    safe: dict[str, Any] = {}
    for key, value in hparams.items():
        try:
            safe[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            warnings.warn(
                f"Hyperparameter {key!r} of {type(obj).__name__} is not JSON-serializable and is stored as its repr; "
                "tools that rebuild the model from the trace alone will need it passed explicitly.",
                stacklevel=3,
            )
            safe[key] = repr(value)
    return ClassSpec(path, safe)
