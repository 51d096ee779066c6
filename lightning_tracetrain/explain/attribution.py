"""Attribution of a layer's pre-activations, from one chunk of steps up to examples and classes.

:func:`attribute_chunk` is what an explanation pass computes per chunk and layer;
:func:`example_attribution`, :func:`class_attribution` and :func:`ridge_densities`
aggregate its per-step results over a trace's step and example tables
(Algorithms 1 and 3). The formulas live in :mod:`lightning_tracetrain.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.trace import Examples, FactorRows, LowRankFactors, StepTable


@dataclass
class LayerAttribution:
    """Per-step attribution of one layer's pre-activation, for all queries of a call."""

    gamma: Tensor  # (Q, steps): <Z, H D_t^T + d_t>
    cos: Tensor  # (Q, steps)
    norm: Tensor  # (Q, steps): ||H D_t^T + d_t||
    init: Tensor  # (Q,): gamma_0, the initialization's share
    z_sq: Tensor  # (Q,): ||Z||^2
    # factored layers (storage="factored"): each training example row's exact share of gamma, (Q, example rows);
    # the rows of step t (Trace.steps.example_start/stop) sum to gamma[:, t]
    rows: Tensor | None = None
    # low-rank layers (storage="lowrank"): <G, R>, the share of what the stored products lack (the residual R),
    # attributed to no step, (Q,); zero for other layers
    unattributed: Tensor | None = None

    @property
    def residual(self) -> Tensor:
        """Relative completeness residual ``(gamma_0 + sum_t gamma_t + unattributed - ||Z||^2) / ||Z||^2`` (zero up
        to rounding)."""
        total = self.init.double() + self.gamma.double().sum(1)
        if self.unattributed is not None:
            total = total + self.unattributed.double()
        return (total - self.z_sq.double()) / self.z_sq.double().clamp_min(1e-30)


@dataclass
class LayerQueries:
    """What a layer needs of the queries for a pass: inputs ``H``, pre-activations ``Z`` and query gradients ``G``."""

    xs: list[Tensor]  # the layer's input for each query
    zs: list[Tensor]  # its pre-activation with the final weights
    grads: dict[str, Tensor]  # (Q, *param): G of 0.5 ||Z||^2 per parameter

    @property
    def z_norm(self) -> Tensor:
        return torch.stack([z.norm() for z in self.zs])[:, None]

    def to(self, device: torch.device) -> LayerQueries:
        return LayerQueries(
            [x.to(device) for x in self.xs],
            [z.to(device) for z in self.zs],
            {p: g.to(device) for p, g in self.grads.items()},
        )


def query_state(layer: nn.Module, xs: list[Tensor], zs: list[Tensor], params: dict[str, Tensor]) -> LayerQueries:
    """The queries' gradients ``G`` at the layer's final ``params``."""
    grads = [Fx.query_gradient(layer, x, params)[1] for x in xs]
    return LayerQueries(xs, zs, {p: torch.stack([g[p] for g in grads]) for p in params})


def attribute_chunk(
    layer: nn.Module,
    queries: LayerQueries,
    deltas: dict[str, Tensor],
    factors: FactorRows | LowRankFactors | None = None,
    norms: bool = True,
) -> dict[str, Tensor]:
    """One chunk of one layer: ``gamma`` ``(Q, T)``; with ``norms`` also ``norm`` and ``cos``; for a factored
    layer ``rows`` ``(Q, R)``, each example row's exact share; and ``sum/{param}``, the chunk's summed change.

    ``deltas`` are the stored dense deltas; a factored weight comes as ``factors`` and is never rebuilt:
    its gamma is the sum of its rows' shares, its norms come from the rows (:func:`~lightning_tracetrain.
    functional.factored_norms`) and its summed change is ``outputs^T inputs``. A low-rank weight comes as its
    products' factors: gamma is ``<P_t, G Q_t>`` (:func:`~lightning_tracetrain.functional.lowrank_gammas`), for
    a linear layer from the queries' rows where that is cheaper; only the norms rebuild its steps.
    """
    out: dict[str, Tensor] = {f"sum/{p}": d.double().sum(0) for p, d in deltas.items()}
    if isinstance(factors, LowRankFactors):
        p, q = factors.p, factors.q
        rows = sum(x.reshape(-1, x.shape[-1]).shape[0] for x in queries.xs)
        if len(factors.shape) == 2 and Fx.row_form_pays(p, q, rows, len(queries.xs)):  # a linear layer
            gamma = Fx.lowrank_row_gammas(p, q, queries.xs, queries.zs)
        else:
            gamma = Fx.lowrank_gammas(p, q, queries.grads["weight"])
        if "bias" in deltas:
            gamma = gamma + Fx.step_gammas({"bias": deltas["bias"]}, queries.grads).T
        out["sum/weight"] = Fx.lowrank_sum(p, q, factors.shape)
        if norms:
            dense = {"weight": Fx.lowrank_deltas(p, q, factors.shape), **deltas}
            out["norm"] = Fx.contribution_norms(layer, queries.xs, dense)
    elif factors is None:
        gamma = Fx.step_gammas(deltas, queries.grads).T
        if norms:
            out["norm"] = Fx.contribution_norms(layer, queries.xs, deltas)
    else:
        counts = factors.counts.tolist()
        rows = Fx.row_gammas(factors.inputs, factors.outputs, queries.xs, queries.zs, bias=False)
        gamma = Fx.step_sums(rows, counts)
        if "bias" in deltas:
            gamma = gamma + Fx.step_gammas({"bias": deltas["bias"]}, queries.grads).T
            rows = rows + (factors.outputs @ queries.grads["bias"].to(factors.outputs.dtype).T).T
        out["rows"] = rows
        out["sum/weight"] = Fx.factored_sum(factors.inputs, factors.outputs)
        if norms:
            out["norm"] = Fx.factored_norms(factors.inputs, factors.outputs, counts, deltas.get("bias"), queries.xs)
    out["gamma"] = gamma
    if norms:
        out["cos"] = Fx.cosines(gamma, queries.z_norm.to(gamma.device), out["norm"])
    return out


def example_attribution(
    steps: StepTable,
    examples: Examples,
    step_scores: Tensor,
    stop: int,
    split: bool = True,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Algorithm 1 over the first ``stop`` steps' real rows: ``(Q, num_examples)`` scores and each example's label.

    With ``split`` a step's score is divided equally over its real examples (gamma);
    without, every example of the step gets the whole score (the cosine ranking).
    With ``rows`` (:attr:`LayerAttribution.rows` of a factored layer) every example row
    gets its exact share of gamma instead, ghost rows included, so the scores of a step's
    examples add up to its gamma even in a mixed batch.
    """
    row_step = np.repeat(np.arange(stop), steps.rows[:stop])
    n_rows = int(steps.example_stop[stop - 1]) if stop else 0
    if rows is not None:
        keep = np.ones(n_rows, dtype=bool)
        step_scores, row_step, weight = rows[:, :n_rows], np.arange(n_rows), np.ones(n_rows)
    else:
        keep = ~examples.ghost[:n_rows]
        n_real = np.bincount(row_step[keep], minlength=stop).astype(np.float64)
        weight = 1.0 / np.maximum(n_real[row_step[keep]], 1) if split else np.ones(int(keep.sum()))
    index = examples.index[:n_rows][keep]
    num = int(index.max()) + 1 if len(index) else 0
    scores = Fx.example_scores(
        step_scores.double(), torch.from_numpy(row_step[keep]), torch.from_numpy(index), torch.from_numpy(weight), num
    )
    labels = np.full(num, -1, dtype=np.int64)
    label = examples.label[:n_rows][keep]
    if label.ndim == 1:
        labels[index] = label
    return scores, torch.from_numpy(labels)


def class_attribution(example_scores: Tensor, labels: Tensor) -> dict[int, Tensor]:
    """Per class, the summed example scores ``(Q,)``: for single-class steps, the class's share of gamma."""
    return {int(c): example_scores[:, labels == c].sum(1) for c in torch.unique(labels) if c >= 0}


def step_class_shares(
    steps: StepTable, examples: Examples, stop: int, num_classes: int, rows: Tensor | None = None
) -> Tensor:
    """``(stop, classes)``: each step's share per class, from its real rows' labels (single-class steps: one-hot).

    With ``rows`` (one query's exact shares of gamma per example row, a factored layer) a row counts
    by the absolute value of its share, ghost rows included, instead of 1.
    """
    n_rows = int(steps.example_stop[stop - 1]) if stop else 0
    if examples.label.ndim == 1:
        labels = torch.from_numpy(examples.label[:n_rows].astype(np.int64))
    else:  # multi-column labels: the step's own label, if it has one, for each of its rows
        labels = torch.from_numpy(np.repeat(steps.label[:stop], steps.rows[:stop]))
    if rows is None:
        labels = labels.masked_fill(torch.from_numpy(examples.ghost[:n_rows]), -1)
    weights = None if rows is None else rows[:n_rows]
    return Fx.step_class_shares(torch.from_numpy(steps.rows[:stop]), labels, num_classes, weights)


def ridge_densities(
    attribution: LayerAttribution, shares: Tensor, query: int, grid: Tensor, bandwidth: float = 0.1
) -> dict[int, Tensor]:
    """Algorithm 3: per class, the weighted KDE of ``cos_t`` over the steps (weights: ``||H D_t^T + d_t||`` times
    the class's share of the step, see :func:`step_class_shares`: with single-class steps, the class's steps)."""
    cos, norm = attribution.cos[query].double(), attribution.norm[query].double()
    shares = shares[: cos.shape[0]]
    return {
        c: Fx.weighted_kde(cos, norm * shares[:, c], grid.double(), bandwidth)
        for c in range(shares.shape[1])
        if shares[:, c].sum() > 0
    }
