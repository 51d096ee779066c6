"""``storage="factored"`` on digits with ordinary shuffled batches: size, exactness, per-example attribution.

One run of configs/digits_factored.yaml's workload (shuffled batches of 32, plain SGD) is traced
twice at once, ``lossless`` and ``factored``, so both traces hold the same steps. Reports

- stored bytes over float32 bytes per mode, and for each factored layer alone;
- exactness: the factored trace's per-step gamma against the lossless one, and how far each
  step's per-example shares are from adding up to its gamma;
- what exact shares change for Algorithm 1 on mixed batches: for test queries, the fraction of
  the top-10 training examples (by gamma) of the factored layer that have the query's predicted
  class, with exact per-example shares against the equal split of each step (chance: about 0.1);
- the time of one explanation pass with norms, factored over lossless.

Writes a JSON result with machine details.

    python benchmarks/factored.py [--epochs 10] [--queries 100] [--out benchmarks/results/factored_digits_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tracetrain import functional as Fx
from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.metrics import class_share, identical_class
from lightning_tracetrain.workloads.runs import single_batches, storage_ratios, trace_modes


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/factored_digits_cpu.json"))
    return parser


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits_factored")
        traces = trace_modes(model, datamodule, Path(tmp), {"lossless": {}, "factored": {}}, args.epochs)
        factored = traces["factored"]
        storage = storage_ratios(traces)
        per_layer = {
            layer: {"stored_bytes": {mode: trace.nbytes([layer])["stored"] for mode, trace in traces.items()}}
            for layer in factored.spec.factored or ()
        }
        queries = single_batches(datamodule.test_dataset, range(args.queries))
        results, seconds = {}, {}
        for mode, trace in traces.items():
            explainer = Explainer(model.eval(), trace)
            logits = explainer.set_queries(queries)
            begin = time.perf_counter()
            results[mode] = explainer.run(accelerator="cpu")
            seconds[mode] = time.perf_counter() - begin
        predicted = logits.argmax(1)
        for layer, entry in per_layer.items():
            exact, dense = results["factored"][layer], results["lossless"][layer]
            assert exact.rows is not None
            steps = factored.steps
            shares = Fx.step_sums(exact.rows, steps.example_stop - steps.example_start)
            scale = exact.z_sq[:, None]
            with_shares, labels = example_attribution(
                steps, factored.examples, exact.gamma, factored.num_steps, rows=exact.rows
            )
            split, _ = example_attribution(steps, traces["lossless"].examples, dense.gamma, factored.num_steps)
            entry.update(
                {
                    "gamma_vs_lossless_max_rel": float(((exact.gamma - dense.gamma).abs() / scale).max()),
                    "shares_vs_step_gamma_max_rel": float(((shares - exact.gamma).abs() / scale).max()),
                    "completeness_residual_max": float(exact.residual.abs().max()),
                    "top10_same_class_exact": identical_class(with_shares, labels, predicted, k=10),
                    "top10_same_class_equal_split": identical_class(split, labels, predicted, k=10),
                    "top1_same_class_exact": identical_class(with_shares, labels, predicted),
                    "top1_same_class_equal_split": identical_class(split, labels, predicted),
                    "class_share_of_predicted_exact": class_share(with_shares, labels, predicted),
                    "class_share_of_predicted_equal_split": class_share(split, labels, predicted),
                }
            )
    result = {
        "benchmark": "storage='factored' vs 'lossless' on digits with shuffled batches (plain SGD)",
        "command": "python benchmarks/factored.py",
        "epochs": args.epochs,
        "queries": args.queries,
        "factored_layers": list(factored.spec.factored or ()),
        "storage": storage,
        "layers": per_layer,
        "explain_seconds": seconds,
        "explain_factored_over_lossless": seconds["factored"] / seconds["lossless"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for mode, s in storage.items():
        print(f"{mode:<9} stored / float32 bytes: {s['stored_over_float32']:.3f}")
    for layer, e in per_layer.items():
        b = e["stored_bytes"]
        print(
            f"{layer}: {b['factored'] / b['lossless']:.2f}x the lossless bytes; gamma vs lossless "
            f"{e['gamma_vs_lossless_max_rel']:.1e}, shares vs step gamma {e['shares_vs_step_gamma_max_rel']:.1e} "
            f"(of ||Z||^2); top-10 of the predicted class: exact {e['top10_same_class_exact']:.2f}, equal split "
            f"{e['top10_same_class_equal_split']:.2f}; predicted class's share of gamma: exact "
            f"{e['class_share_of_predicted_exact']:.2f}, equal split {e['class_share_of_predicted_equal_split']:.2f}"
        )
    print(f"explanation pass: factored {seconds['factored']:.2f} s, lossless {seconds['lossless']:.2f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
