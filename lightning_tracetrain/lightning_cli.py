"""LightningCLI for this package's configs: model, datamodule and callbacks (``TraceCallback``) by ``class_path``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

PROG = "python -m lightning_tracetrain"


def cli_main(args: list[str] | None = None) -> LightningCLI:
    """``fit``/``validate``/``test``/``predict`` with a config such as ``configs/digits.yaml``."""
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": PROG},
    )
