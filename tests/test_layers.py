"""Which layers are traceable, and how a selection resolves."""

from __future__ import annotations

import pytest
from torch import nn
from torch_geometric.nn import GCNConv, GINConv

from lightning_tracetrain import UnknownLayerError
from lightning_tracetrain.recording.layers import layer_parameters, select_layers, traceable_layers


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c3 = nn.Conv3d(2, 3, 3)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.gcn = GCNConv(4, 4)
        self.gin = GINConv(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        self.emb = nn.Embedding(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2, bias=False)


def test_traceable_layers_are_linear_maps_with_trainable_weights():
    names = list(traceable_layers(Mixed()))
    # BatchNorm, Embedding, the GCNConv wrapper itself and frozen layers are not traced
    assert names == ["c1", "c3", "features.0", "features.3", "gcn.lin", "gin.nn.0", "head"]


def test_selection_by_name_and_pattern_keeps_module_order():
    model = Mixed()
    assert list(select_layers(model, "head")) == ["head"]
    assert list(select_layers(model, ["head", "features.*"])) == ["features.0", "features.3", "head"]
    assert list(select_layers(model, None)) == list(traceable_layers(model))


def test_unknown_or_untraceable_name_lists_the_traceable_ones():
    with pytest.raises(UnknownLayerError, match=r"'features.1' is not a traceable layer of Mixed.*features.0"):
        select_layers(Mixed(), ["head", "features.1"])  # a BatchNorm
    with pytest.raises(UnknownLayerError, match="nothing to trace"):
        select_layers(nn.Sequential(nn.ReLU()))


def test_layer_parameters_include_bias_only_when_present():
    model = Mixed()
    assert list(layer_parameters(model.head)) == ["weight"]
    assert list(layer_parameters(model.c1)) == ["weight", "bias"]
