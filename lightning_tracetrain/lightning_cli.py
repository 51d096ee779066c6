"""LightningCLI for this package's configs: model and datamodule by ``class_path``, the trace under ``trace``.

A config's ``trace:`` section is the run's :class:`~lightning_tracetrain.TraceCallback` (``class_path`` and
``init_args``), so its options are overridden by name on the command line (``--trace.dirpath DIR``,
``--trace.overwrite true``); a config without it trains untraced. Other callbacks stay under
``trainer.callbacks``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_tracetrain.recording import TraceCallback

PROG = "python -m lightning_tracetrain"


class TraceCLI(LightningCLI):
    """LightningCLI with a ``trace`` group for the TraceCallback."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TraceCallback, "trace", subclass_mode=True, required=False)


def cli_main(args: list[str] | None = None) -> LightningCLI:
    """``fit``/``validate``/``test``/``predict`` with a config such as ``configs/digits.yaml``."""
    return TraceCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": PROG},
    )
