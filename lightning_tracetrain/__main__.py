"""``python -m lightning_tracetrain fit --config configs/digits.yaml``: the paper's workloads through LightningCLI.

Model and datamodule are given by ``class_path`` in the config, and so is the
:class:`~lightning_tracetrain.TraceCallback` under ``trainer.callbacks``.
Afterwards, explain with ``python -m lightning_tracetrain.explain --ckpt ... --trace ...``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def cli_main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    cli_main()
