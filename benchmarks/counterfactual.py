"""What the method claims, tested by retraining: do a query's top proponents at layer l build its representation?

The method says which training examples built a test input's pre-activation
``z`` at layer ``l``. If so, retraining without them should move ``z`` back:
lower its projection on its own direction more than removing as many random
examples, or TracIn's top examples at the same layer, does.

For each query and layer: the ``k`` top proponents by our Algorithm-1 gamma at
that layer, ``k`` random training examples, and TracIn's (TracInCP, gradient dot
product, that layer) top ``k`` are each removed, and the digits model of
configs/digits.yaml is retrained from the same initialization, seeds and batches
with the removed examples left out of the loss (they stay in their batches, so
ghost batch norm still sees their inputs and every other example trains in the
same company as before; a retrain that removes nothing reproduces the original
exactly, which the script checks). The movement is ``1 - <z', z> / ||z||^2``, where
``z'`` is the retrained model's pre-activation for the same query. Reported per
layer: the mean movement of each removal and the ratio ours / random and
ours / TracIn over the queries.

    python benchmarks/counterfactual.py [--queries 8] [--k 40] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_tracetrain.baselines import TracIn
from lightning_tracetrain.batch import batch_field, batch_inputs
from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.functional import real_cross_entropy
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.runs import batches, single_batches, train_traced, trainer, write_result


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--k", type=int, default=40, help="examples removed per query and layer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/counterfactual_digits_cpu.json"))
    return parser


def retrained(removed: set[int], epochs: int) -> pl.LightningModule:
    """The digits workload retrained from the same initialization, seeds and batches, the ``removed`` ids left
    out of the loss (the batches keep them, so batch norm still sees their inputs: the closest retrain to
    "the same run without them" that keeps every other example's batch)."""
    pl.seed_everything(0, verbose=False)
    model, datamodule = build("digits", data={"seed": 0})
    model.__class__ = type("Without", (type(model),), {"training_step": _training_step_without})
    model.removed = torch.tensor(sorted(removed), dtype=torch.long)
    trainer(epochs).fit(model, datamodule)
    return model.eval()


def _training_step_without(self: Any, batch: Any, batch_idx: int) -> Tensor:
    """The workload's loss over the batch's real rows that were not removed."""
    y = batch_field(batch, "y").reshape(-1)
    left_out = batch_field(batch, "ghost") | torch.isin(batch_field(batch, "index"), self.removed.to(y.device))
    return real_cross_entropy(self(batch_inputs(batch)), y, left_out)


def pre_activations(model: pl.LightningModule, layers: list[str], queries: list[dict[str, Tensor]]) -> dict:
    """Each layer's pre-activation for each query, flattened: ``{layer: (Q, features)}``."""
    modules, seen = dict(model.named_modules()), {name: [] for name in layers}
    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(out.flatten())) for n in layers]
    with torch.no_grad():
        for q in queries:
            model(q["x"])
    for h in hooks:
        h.remove()
    return {n: torch.stack(v) for n, v in seen.items()}


def movement(z: Tensor, z_new: Tensor) -> Tensor:
    """``1 - <z', z> / ||z||^2`` per query: how much of ``z`` along its own direction the retrain took away."""
    return 1 - (z_new * z).sum(1) / z.pow(2).sum(1).clamp_min(1e-12)


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, datamodule, trace = train_traced("digits", Path(tmp) / "trace", args.epochs)
        queries = single_batches(datamodule.test_dataset, range(args.queries))
        layers = trace.layers
        ours = {
            name: example_attribution(trace.steps, trace.examples, a.gamma, trace.num_steps)[0]
            for name, a in Explainer(model, trace, norms=False).explain(queries).items()
        }
        train_batches = batches(datamodule.train_dataset)
        tracin = TracIn(model, trace).scores(train_batches, batches(datamodule.test_dataset, range(args.queries)))
    n = len(datamodule.train_dataset)
    original = pre_activations(model, layers, queries)
    same = pre_activations(retrained(set(), args.epochs), layers, queries)
    reproducible = max(float((original[n_] - same[n_]).abs().max()) for n_ in layers)
    g = torch.Generator().manual_seed(0)
    result_layers: dict[str, Any] = {}
    for layer in layers:
        moves: dict[str, list[float]] = {"ours": [], "random": [], "tracin": []}
        for q in range(args.queries):
            removals = {
                "ours": ours[layer][q].topk(args.k).indices.tolist(),
                "random": torch.randperm(n, generator=g)[: args.k].tolist(),
                "tracin": tracin[layer][q].topk(args.k).indices.tolist(),
            }
            for how, ids in removals.items():
                z_new = pre_activations(retrained(set(ids), args.epochs), [layer], [queries[q]])[layer]
                moves[how].append(float(movement(original[layer][q : q + 1], z_new)[0]))
            print(layer, q, {h: round(v[-1], 4) for h, v in moves.items()}, flush=True)
        mean = {h: statistics.mean(v) for h, v in moves.items()}
        result_layers[layer] = {
            "movement_mean": mean,
            "movements": moves,
            "ours_over_random": mean["ours"] / mean["random"] if mean["random"] else float("inf"),
            "ours_over_tracin": mean["ours"] / mean["tracin"] if mean["tracin"] else float("inf"),
        }
    result = {
        "benchmark": "counterfactual retraining: removing a query's top-k proponents at a layer",
        "command": f"python benchmarks/counterfactual.py --queries {args.queries} --k {args.k} --epochs {args.epochs}",
        "queries": args.queries,
        "k": args.k,
        "retrain_without_removal_max_difference": reproducible,
        "seconds": time.perf_counter() - started,
        "layers": result_layers,
    }
    write_result(args.out, result, markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"| layer | ours (top {result['k']} by gamma) | random {result['k']} | TracIn top {result['k']} "
        "| ours / random | ours / TracIn |",
        "|---|---|---|---|---|---|",
    ]
    for layer, r in result["layers"].items():
        m = r["movement_mean"]
        lines.append(
            f"| `{layer}` | {m['ours']:.4f} | {m['random']:.4f} | {m['tracin']:.4f} | {r['ours_over_random']:.1f} "
            f"| {r['ours_over_tracin']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
