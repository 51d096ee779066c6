"""LightningModules of the paper's workloads."""

from lightning_tracetrain.models.classifier import Classifier
from lightning_tracetrain.models.cnn import DigitsCNN
from lightning_tracetrain.models.gin import PpaGIN
from lightning_tracetrain.models.vgg import VGG16

__all__ = ["VGG16", "Classifier", "DigitsCNN", "PpaGIN"]
