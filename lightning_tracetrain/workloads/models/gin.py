"""GINs: OGB's ppa GIN with edge features (and the paper's shallow variant), and a GIN for featureless motif graphs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing, global_add_pool, global_mean_pool

from lightning_tracetrain.batch import batch_inputs
from lightning_tracetrain.singleclass.ghost import GhostBatchNormNodes
from lightning_tracetrain.workloads.models.classifier import Classifier


class GINEdgeConv(MessagePassing):
    """OGB's GIN layer: ``mlp((1 + eps) x + sum_j relu(x_j + edge_encoder(e_ij)))``; with ``edge_dim=None``
    the plain GIN layer ``mlp((1 + eps) x + sum_j x_j)`` of graphs without edge features."""

    def __init__(self, emb_dim: int, edge_dim: int | None = 7, norm: type[nn.Module] = GhostBatchNormNodes) -> None:
        super().__init__(aggr="add")
        self.mlp = nn.Sequential(
            nn.Linear(emb_dim, 2 * emb_dim), norm(2 * emb_dim), nn.ReLU(), nn.Linear(2 * emb_dim, emb_dim)
        )
        self.eps = nn.Parameter(torch.zeros(1))
        self.edge_encoder = None if edge_dim is None else nn.Linear(edge_dim, emb_dim)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        edge = None if self.edge_encoder is None else self.edge_encoder(edge_attr)
        return self.mlp((1 + self.eps) * x + self.propagate(edge_index, x=x, edge_attr=edge))

    def message(self, x_j: Tensor, edge_attr: Tensor | None) -> Tensor:
        return x_j if edge_attr is None else F.relu(x_j + edge_attr)


class PpaGIN(Classifier):
    """OGB's ppa GIN: node embedding, ``num_layers`` GIN layers with edge encoder ``Linear(7, emb_dim)``,
    ghost batch norm over nodes, mean pooling and ``Linear(emb_dim, 37)``. ``num_layers=1`` is the
    paper's shallow model (one graph conv and a linear head).

    Traced layers: ``convs.{i}.mlp.0``, ``convs.{i}.mlp.3``, ``convs.{i}.edge_encoder`` and ``head``.

    Args:
        num_layers: GIN layers (OGB: 5).
        emb_dim: Hidden width (OGB: 300).
        num_classes: Classes (ppa: 37).
        dropout: Dropout after each layer (OGB: 0.5).
        lr: Learning rate (OGB: 1e-3).
        momentum: SGD momentum, Nesterov (the paper: 0.9).
        lr_milestones: Epochs at which the learning rate is divided by 10 (the paper: 10 and 40).
        ghost_batch_norm: Ghost batch norm over the nodes instead of plain batch norm.
    """

    def __init__(
        self,
        num_layers: int = 5,
        emb_dim: int = 300,
        num_classes: int = 37,
        dropout: float = 0.5,
        lr: float = 1e-3,
        momentum: float = 0.9,
        lr_milestones: list[int] | None = None,
        ghost_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm = GhostBatchNormNodes if ghost_batch_norm else nn.BatchNorm1d
        self.node_encoder = nn.Embedding(1, emb_dim)
        self.convs = nn.ModuleList(GINEdgeConv(emb_dim, norm=norm) for _ in range(num_layers))
        self.norms = nn.ModuleList(norm(emb_dim) for _ in range(num_layers))
        self.head = nn.Linear(emb_dim, num_classes)
        self._seen: dict[str, list[tuple[Tensor, Tensor]]] = {}  # labels and predictions for OGB's Evaluator

    def forward(self, batch: Any) -> Tensor:
        h = self.node_encoder(batch.x.reshape(-1))
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = norm(conv(h, batch.edge_index, batch.edge_attr))
            if i < len(self.convs) - 1:
                h = F.relu(h)
            h = F.dropout(h, self.hparams.dropout, training=self.training)
        return self.head(global_mean_pool(h, batch.batch))

    def _evaluate(self, batch: Any, stage: str) -> None:
        super()._evaluate(batch, stage)
        with torch.no_grad():
            pred = self(batch_inputs(batch)).argmax(-1)
        self._seen.setdefault(stage, []).append((batch.y.reshape(-1).cpu(), pred.cpu()))

    def _log_ogb_accuracy(self, stage: str) -> None:
        from lightning_tracetrain.workloads.data.ogbg_ppa import ogb_accuracy

        seen = self._seen.pop(stage, [])
        if seen:
            y, pred = (torch.cat(parts) for parts in zip(*seen, strict=True))
            self.log(f"{stage}_ogb_acc", ogb_accuracy(y, pred), prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_ogb_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_ogb_accuracy("test")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        return self.step_schedule(opt, list(hp.lr_milestones or [10, 40]))


class MotifGIN(Classifier):
    """A GIN for graphs without node or edge features (the motif workload): every node starts from one
    learned embedding, ``num_layers`` GIN layers (MLP ``Linear``, ghost batch norm over nodes, ReLU,
    ``Linear``) each followed by batch norm over nodes, sum (or mean) pooling and a linear head.
    ``num_layers=1`` sees only each node's degree.

    Traced layers: ``convs.{i}.mlp.0``, ``convs.{i}.mlp.3`` and ``head``.

    Args:
        num_layers: GIN layers.
        emb_dim: Hidden width.
        num_classes: Classes (motif types).
        pool: ``add`` (counts, GIN's choice) or ``mean`` (OGB's).
        lr: Learning rate of Adam (SGD plateaus for many epochs on these graphs).
        lr_milestones: Epochs at which the learning rate is divided by 10 (none by default).
        ghost_batch_norm: Ghost batch norm over the nodes instead of plain batch norm.
    """

    def __init__(
        self,
        num_layers: int = 4,
        emb_dim: int = 32,
        num_classes: int = 4,
        pool: str = "add",
        lr: float = 0.01,
        lr_milestones: list[int] | None = None,
        ghost_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if pool not in ("add", "mean"):
            raise ValueError(f"pool must be 'add' or 'mean', got {pool!r}.")
        self.save_hyperparameters()
        norm = GhostBatchNormNodes if ghost_batch_norm else nn.BatchNorm1d
        self.node_encoder = nn.Embedding(1, emb_dim)
        self.convs = nn.ModuleList(GINEdgeConv(emb_dim, edge_dim=None, norm=norm) for _ in range(num_layers))
        self.norms = nn.ModuleList(norm(emb_dim) for _ in range(num_layers))
        self.head = nn.Linear(emb_dim, num_classes)

    def forward(self, batch: Any) -> Tensor:
        h = self.node_encoder(batch.x.reshape(-1))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.relu(norm(conv(h, batch.edge_index)))
        pool = global_add_pool if self.hparams.pool == "add" else global_mean_pool
        return self.head(pool(h, batch.batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return self.step_schedule(opt, list(self.hparams.lr_milestones or []))
