"""Datamodules of the paper's workloads, following the batch protocol."""

from lightning_tracetrain.workloads.data.cifar10 import CIFAR10DataModule
from lightning_tracetrain.workloads.data.digits import DigitsDataModule
from lightning_tracetrain.workloads.data.motifs import MotifsDataModule
from lightning_tracetrain.workloads.data.ogbg_ppa import OgbgPpaDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "MotifsDataModule", "OgbgPpaDataModule"]
