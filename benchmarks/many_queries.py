"""Thousands of queries in bounded memory: peak memory, time and output sizes of one explain command.

Trains the digits workload of configs/digits.yaml with tracing, then runs
``python -m lightning_tracetrain.explain`` in a fresh process for N queries (the
test set's 360 digits, cycled) and for 3 queries, and reports each process's
peak resident memory (``getrusage``), wall time and the sizes of influence.json
and report.html. Writes a JSON result with machine details.

    python benchmarks/many_queries.py [--queries 2000] [--epochs 10] [--query-batch 512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_tracetrain import TraceCallback
from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--query-batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/many_queries_digits_cpu.json"))
    return parser


def _explain(folder: Path, queries: int, query_batch: int, name: str) -> dict[str, float]:
    """One explain command in a fresh process: its peak memory, time and output sizes."""
    out = folder / name
    command = [
        sys.executable, "-m", "lightning_tracetrain.explain", "--ckpt", str(folder / "last.ckpt"),
        "--trace", str(folder / "trace"), "--out", str(out), "--query-batch", str(query_batch),
        "--queries", *map(str, (i % 360 for i in range(queries))),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, the largest child so far
    assert peak >= before, "run the larger command last: getrusage keeps the largest child's peak"
    return {
        "queries": queries,
        "peak_rss_mib": peak / 1024,
        "seconds": seconds,
        "influence_json_mib": (out / "influence.json").stat().st_size / 2**20,
        "report_html_mib": (out / "report.html").stat().st_size / 2**20,
    }


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits")
        trainer = quiet_trainer(
            max_epochs=args.epochs, accelerator="cpu", use_distributed_sampler=False,
            callbacks=[TraceCallback(folder / "trace")],
        )  # fmt: skip
        trainer.fit(model, datamodule)
        trainer.save_checkpoint(folder / "last.ckpt")
        few = _explain(folder, 3, args.query_batch, "few")
        many = _explain(folder, args.queries, args.query_batch, "many")
    result = {
        "benchmark": f"explain for {args.queries} queries on digits: peak memory, time, output sizes",
        "command": f"python benchmarks/many_queries.py --queries {args.queries} --query-batch {args.query_batch}",
        "query_batch": args.query_batch,
        "few_queries": few,
        "many_queries": many,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for label, r in (("3 queries", few), (f"{args.queries} queries", many)):
        print(
            f"{label:>14}: peak {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s, influence.json "
            f"{r['influence_json_mib']:.1f} MiB, report.html {r['report_html_mib']:.1f} MiB"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
