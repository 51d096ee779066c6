"""LightningModules of the paper's workloads."""

from lightning_tracetrain.models.cnn import DigitsCNN

__all__ = ["DigitsCNN"]
