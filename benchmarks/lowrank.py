"""Bytes against fidelity of ``storage="lowrank"``: ranks 1-16, with and without error feedback, vs lossless.

One run of a wide digits CNN (configs/digits.yaml's workload, the paper's way:
single-class batches with ghost samples and ghost batch norm, with 64 and 128
conv channels and a 2048 -> 512 hidden layer) is traced at once by a lossless
TraceCallback and one low-rank TraceCallback per rank and residual policy, so
every trace holds the same steps. Test inputs are explained with each trace;
per layer, against the lossless explanation:

- top-10 overlap: the share of the 10 top proponents (Algorithm 1, gamma) that agree;
- Spearman of the per-step gamma;
- class-share L1: the L1 distance of the classes' shares of |gamma| (Algorithm 3's weights);
- ridge TV: the total variation distance of the per-class ridge densities (Algorithm 3);
- unattributed: the residual's share ``|<G, R>| / ||Z||^2``.

Also the stored bytes over float32 and the time of one gamma-only explanation pass.
Writes a JSON result and prints the Markdown table of the README.

    python benchmarks/lowrank.py [--epochs 10] [--queries 40] [--ranks 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.explain.attribution import LayerAttribution, ridge_densities, step_class_shares
from lightning_tracetrain.trace import Trace
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.metrics import spearman
from lightning_tracetrain.workloads.runs import single_batches, storage_ratios, trace_modes, write_result

GRID = torch.linspace(-1, 1, 201)


def class_shares(trace: Trace, gamma: torch.Tensor, classes: int) -> torch.Tensor:
    """``(Q, classes)``: each class's share of the queries' |gamma| (steps weighted by their class share)."""
    shares = step_class_shares(trace.steps, trace.examples, trace.num_steps, classes).double()
    mass = gamma.double().abs() @ shares
    return mass / mass.sum(1, keepdim=True).clamp_min(1e-300)


def ridge_tv(trace: Trace, a: LayerAttribution, b: LayerAttribution, classes: int) -> float:
    """Mean over queries and classes of the total variation distance between the two ridge densities."""
    shares = step_class_shares(trace.steps, trace.examples, trace.num_steps, classes)
    step = float(GRID[1] - GRID[0])
    out = []
    for q in range(a.gamma.shape[0]):
        da, db = ridge_densities(a, shares, q, GRID), ridge_densities(b, shares, q, GRID)
        out += [0.5 * float((da[c] - db[c]).abs().sum()) * step for c in da if c in db]
    return sum(out) / max(1, len(out))


def compare(trace: Trace, exact: LayerAttribution, approx: LayerAttribution, classes: int) -> dict[str, float]:
    """Fidelity of one layer's explanation from ``approx`` against ``exact`` (same steps, same queries)."""
    ex_a, _ = example_attribution(trace.steps, trace.examples, exact.gamma, trace.num_steps)
    ex_b, _ = example_attribution(trace.steps, trace.examples, approx.gamma, trace.num_steps)
    top_a, top_b = ex_a.topk(10, dim=1).indices, ex_b.topk(10, dim=1).indices
    overlap = [len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(top_a, top_b, strict=True)]
    rho = [spearman(x, y) for x, y in zip(exact.gamma, approx.gamma, strict=True)]
    l1 = (class_shares(trace, exact.gamma, classes) - class_shares(trace, approx.gamma, classes)).abs().sum(1)
    unattributed = torch.zeros(1) if approx.unattributed is None else approx.unattributed
    return {
        "top10_overlap": sum(overlap) / len(overlap),
        "top10_overlap_min": min(overlap),
        "spearman": sum(rho) / len(rho),
        "spearman_min": min(rho),
        "class_share_l1": float(l1.mean()),
        "ridge_tv": ridge_tv(trace, exact, approx, classes),
        "unattributed": float((unattributed.abs() / approx.z_sq).mean()),
        "completeness_max": float(approx.residual.abs().max()),
    }


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lowrank_digits-wide_cpu.json"))
    return parser


def _pass(model: pl.LightningModule, trace: Trace, queries: list[Any], norms: bool) -> tuple[dict, float]:
    explainer = Explainer(model, trace, norms=norms)
    explainer.set_queries(queries)
    start = time.perf_counter()
    result = explainer.run(accelerator="cpu")
    return result, time.perf_counter() - start


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    modes = {"lossless": {}} | {
        f"lowrank-r{r}{'-feedback' if fb else ''}": {"storage": "lowrank", "rank": r, "feedback": fb}
        for r in args.ranks
        for fb in (False, True)
    }
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits", model={"channels": args.channels, "hidden": args.hidden})
        start = time.perf_counter()
        traces = trace_modes(model, datamodule, Path(tmp), modes, args.epochs)
        train_s = time.perf_counter() - start
        storage = storage_ratios(traces)
        queries = single_batches(datamodule.test_dataset, range(args.queries))
        model.eval()
        exact, _ = _pass(model, traces["lossless"], queries, norms=True)
        _, exact_s = _pass(model, traces["lossless"], queries, norms=False)
        rows: dict[str, Any] = {}
        for name, trace in traces.items():
            if name == "lossless":
                continue
            approx, _ = _pass(model, trace, queries, norms=True)
            _, seconds = _pass(model, trace, queries, norms=False)
            layers = {layer: compare(trace, exact[layer], approx[layer], 10) for layer in exact}
            rows[name] = {
                "stored_over_float32": storage[name]["stored_over_float32"],
                "explain_s": seconds,
                "explain_speedup": exact_s / seconds,
                "lowrank_layers": list(trace.spec.lowrank),
                "layers": layers,
            }
    result = {
        "benchmark": "lowrank storage: bytes against fidelity (wide digits CNN, the paper's batches)",
        "command": "python benchmarks/lowrank.py " + " ".join(f"--{k} {v}" for k, v in _flags(args).items()),
        "steps": traces["lossless"].num_steps,
        "train_and_record_s": train_s,
        "lossless": {"stored_over_float32": storage["lossless"]["stored_over_float32"], "explain_s": exact_s},
        "modes": rows,
    }
    write_result(args.out, result, markdown(result))


def _flags(args: argparse.Namespace) -> dict[str, str]:
    return {
        "epochs": str(args.epochs),
        "queries": str(args.queries),
        "ranks": " ".join(map(str, args.ranks)),
        "channels": str(args.channels),
        "hidden": str(args.hidden),
    }


def markdown(result: dict[str, Any]) -> str:
    """Per mode: bytes, pass time, and the worst layer's fidelity (the goals hold at every layer)."""
    lines = [
        "| storage | bytes / float32 | explain pass | top-10 overlap (worst layer) | Spearman of gamma (worst) "
        "| class-share L1 (worst) | ridge TV (worst) | unattributed (worst) |",
        "|---|---|---|---|---|---|---|---|",
        f"| lossless | {result['lossless']['stored_over_float32']:.3f} | {result['lossless']['explain_s']:.2f} s "
        "| 1 | 1 | 0 | 0 | 0 |",
    ]
    for name, row in result["modes"].items():
        layers = row["layers"].values()
        worst = {
            "top10_overlap": min(v["top10_overlap"] for v in layers),
            "spearman": min(v["spearman"] for v in layers),
            "class_share_l1": max(v["class_share_l1"] for v in layers),
            "ridge_tv": max(v["ridge_tv"] for v in layers),
            "unattributed": max(v["unattributed"] for v in layers),
        }
        lines.append(
            f"| {name} | 1/{1 / row['stored_over_float32']:.0f} | {row['explain_s']:.2f} s "
            f"({row['explain_speedup']:.0f}x faster) | {worst['top10_overlap']:.2f} | {worst['spearman']:.3f} "
            f"| {worst['class_share_l1']:.3f} | {worst['ridge_tv']:.3f} | {worst['unattributed']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
