"""Datamodules of the paper's workloads, following the batch protocol."""

from lightning_tracetrain.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
