"""Storage per mode, and how much `compact` changes explanations against `lossless`.

One digits run (configs/digits.yaml's workload) is traced twice at once, by two
TraceCallbacks (``storage="lossless"`` and ``storage="compact"``), so both
traces hold the same steps. Reports stored bytes over float32 bytes per mode,
then explains test inputs with each trace and compares: overlap of the top-10
training examples per layer (Algorithm 1, gamma) and Spearman correlation of
the per-step gamma. Writes a JSON result with machine details.

    python benchmarks/storage.py [--epochs 10] [--queries 50] [--out benchmarks/results/storage_digits_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.metrics import spearman
from lightning_tracetrain.workloads.runs import single_batches, storage_ratios, trace_modes


def _examples(trace, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return example_attribution(trace.steps, trace.examples, gamma, trace.num_steps)


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--keepbits", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/storage_digits_cpu.json"))
    return parser


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits")
        traces = trace_modes(
            model, datamodule, Path(tmp), {"lossless": {}, "compact": {"keepbits": args.keepbits}}, args.epochs
        )
        storage = storage_ratios(traces)
        queries = single_batches(datamodule.test_dataset, range(args.queries))
        results = {}
        for mode, trace in traces.items():
            explainer = Explainer(model.eval(), trace, norms=False)
            explainer.set_queries(queries)
            results[mode] = explainer.run(accelerator="cpu")
        fidelity = {}
        for layer, lossless in results["lossless"].items():
            compact = results["compact"][layer]
            ex_l, _ = _examples(traces["lossless"], lossless.gamma)
            ex_c, _ = _examples(traces["compact"], compact.gamma)
            top_l, top_c = ex_l.topk(10, dim=1).indices, ex_c.topk(10, dim=1).indices
            overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_l, top_c, strict=True)]
            rho = [spearman(a, b) for a, b in zip(lossless.gamma, compact.gamma, strict=True)]
            fidelity[layer] = {
                "top10_overlap_mean": sum(overlap) / len(overlap),
                "top10_overlap_min": min(overlap),
                "spearman_gamma_mean": sum(rho) / len(rho),
                "spearman_gamma_min": min(rho),
                "completeness_residual_max": float(compact.residual.abs().max()),
            }
    result = {
        "benchmark": "storage per mode, and compact vs lossless explanations (digits CNN)",
        "command": "python benchmarks/storage.py",
        "epochs": args.epochs,
        "queries": args.queries,
        "keepbits": args.keepbits,
        "storage": storage,
        "fidelity": fidelity,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for mode, s in storage.items():
        print(f"{mode:<9} stored / float32 bytes: {s['stored_over_float32']:.3f}")
    for layer, f in fidelity.items():
        print(
            f"{layer:<10} top-10 overlap {f['top10_overlap_mean']:.3f} (min {f['top10_overlap_min']:.2f}), "
            f"Spearman of gamma {f['spearman_gamma_mean']:.4f} (min {f['spearman_gamma_min']:.4f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
