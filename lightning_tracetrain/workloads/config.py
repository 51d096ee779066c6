"""The paper's workloads as ``configs/NAME.yaml`` describe them, for code that trains them outside LightningCLI.

The YAML files are the one place their hyperparameters are written;
evaluations and benchmarks build their models and datamodules from them
(with explicit overrides) instead of repeating the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from lightning_tracetrain.exceptions import UnknownConfigError
from lightning_tracetrain.explain.loading import Trust, import_class
from lightning_tracetrain.trace import ClassSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_path(name: str | Path) -> Path:
    """``configs/NAME.yaml`` of this repository, or a path to a YAML file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml"))) or f"none in {CONFIGS}"
        raise UnknownConfigError(f"No workload config {path}; the configs are: {known}.")
    return path


def load_config(name: str | Path) -> dict[str, Any]:
    """The parsed YAML of a workload config."""
    return yaml.safe_load(config_path(name).read_text())


def build(
    name: str | Path,
    *,
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    trust: Trust = Trust(),
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """A fresh model and datamodule of a workload, their config's ``init_args`` updated by ``model``/``data``
    (classes outside this package are imported only when ``trust`` allows them)."""
    config = load_config(name)
    return (
        _instantiate(config["model"], model or {}, pl.LightningModule, "model", trust),
        _instantiate(config["data"], data or {}, pl.LightningDataModule, "datamodule", trust),
    )


def _instantiate(section: dict[str, Any], overrides: dict[str, Any], base: type, what: str, trust: Trust) -> Any:
    spec = ClassSpec(section["class_path"], {**section.get("init_args", {}), **overrides})
    return import_class(spec, base, trust, what)(**spec.init_args)
