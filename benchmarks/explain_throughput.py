"""Explanation throughput: delta bytes per second against the raw read-and-decode bound, and query scaling.

Trains the digits workload with tracing, then times, with a warm page cache:
reading and decoding every chunk with no compute (the raw bound), and one
Explainer pass for 1, 16 and 256 queries, with ``norms=True`` (gamma, cosine
and contribution norms: the ridge plots) and ``norms=False`` (gamma only).
Writes a JSON result with machine details.

    python benchmarks/explain_throughput.py [--epochs 10] [--out benchmarks/results/explain_throughput_digits_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.explain import Explainer
from lightning_tracetrain.explain.chunks import TraceChunks
from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/explain_throughput_digits_cpu.json"))
    return parser


def main() -> None:
    args = parser().parse_args()
    passes: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits")
        quiet_trainer(
            max_epochs=args.epochs, accelerator="cpu", use_distributed_sampler=False,
            callbacks=[TraceCallback(f"{tmp}/trace")],
        ).fit(model, datamodule)  # fmt: skip
        trace = Trace(f"{tmp}/trace")
        model.eval()
        raw_bytes = trace.nbytes()["raw"]
        chunks = TraceChunks(trace, trace.layers, trace.num_steps)

        def read_all() -> None:
            for i in range(len(chunks)):
                chunks[i]

        read_all()  # warm the page cache
        raw_s = _best(read_all, args.repeats)
        test = datamodule.test_dataset
        collate = datamodule.test_dataloader().collate_fn
        for norms in (True, False):
            for q in args.queries:
                explainer = Explainer(model, trace, norms=norms)
                explainer.set_queries([collate([test[i % len(test)]]) for i in range(q)])
                trainer = quiet_trainer(accelerator="cpu", inference_mode=False)
                seconds = _best(lambda e=explainer, t=trainer: e.run(t), args.repeats)
                passes[f"{'gamma+norms' if norms else 'gamma'} Q={q}"] = {
                    "seconds": seconds,
                    "bytes_per_s": raw_bytes / seconds,
                    "of_raw_bound": raw_s / seconds,
                }
    scaling = {
        kind: passes[f"{kind} Q={args.queries[-1]}"]["seconds"] / passes[f"{kind} Q={args.queries[0]}"]["seconds"]
        for kind in ("gamma+norms", "gamma")
    }
    result = {
        "benchmark": "explanation throughput against the raw read-and-decode bound (digits CNN trace, CPU)",
        "command": "python benchmarks/explain_throughput.py",
        "steps": trace.num_steps,
        "raw_delta_bytes": raw_bytes,
        "raw_read_decode_s": raw_s,
        "raw_bound_bytes_per_s": raw_bytes / raw_s,
        "passes": passes,
        f"cost_of_{args.queries[-1]}_over_{args.queries[0]}_queries": scaling,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"raw read+decode: {raw_s:.3f} s for {raw_bytes / 2**20:.1f} MiB ({raw_bytes / raw_s / 2**20:.0f} MiB/s)")
    for name, p in passes.items():
        print(f"{name:<18} {p['seconds']:.3f} s  {p['of_raw_bound']:.2f} of the raw bound")
    for kind, ratio in scaling.items():
        print(f"{kind}: {args.queries[-1]} queries cost {ratio:.1f}x one query")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
