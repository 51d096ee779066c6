"""What trusting a trace on disk costs: the crc32c checksum on every chunk and the per-step non-finite check.

Trains the digits workload of configs/digits.yaml for a few steps with tracing,
takes the real deltas of every traced layer, tiles them to ``--mib`` MiB of
float32 rows of 4096 values, and writes and reads them as a Zarr array in
chunks of 32 MiB (a trace's chunk size) with the trace's codec chain, without and with Zarr's
``crc32c`` codec (best of ``--repeats``, one process, one core busy). Also
times ``np.isfinite(delta).all()``, the check the writer's background thread
makes per step. Reports bandwidths and their ratios. Writes a JSON result with
machine details.

    python benchmarks/checksums.py [--mib 256] [--repeats 5] [--storage lossless|compact]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import zarr

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.trace.codecs import checksummed, make_compressor
from lightning_tracetrain.trace.schema import StorageMode
from lightning_tracetrain.trainer import quiet_trainer
from lightning_tracetrain.workloads.config import build

ROW = 4096
CHUNK_ROWS = 32 * 2**20 // 4 // ROW  # 32 MiB chunks, as a trace's delta chunks


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of deltas written and read per codec chain")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--storage", choices=["lossless", "compact"], default="lossless")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checksums_digits_cpu.json"))
    return parser


def _real_deltas(folder: Path, storage: str, mib: int) -> np.ndarray:
    """The traced digits run's deltas, flattened and tiled to ``mib`` MiB of rows of ``ROW`` values."""
    pl.seed_everything(0, verbose=False)
    model, datamodule = build("digits")
    trainer = quiet_trainer(max_steps=40, accelerator="cpu", use_distributed_sampler=False)
    trainer.callbacks.append(TraceCallback(folder / "trace", storage=storage))
    trainer.fit(model, datamodule)
    trace = Trace(folder / "trace")
    flat = np.concatenate([d.numpy().ravel() for lay in trace.layers for d in trace.deltas(lay).values()])
    values = np.resize(flat, mib * 2**20 // 4)
    return values.reshape(-1, ROW)


def _bandwidth(rows: np.ndarray, codecs: tuple, folder: Path, repeats: int) -> dict[str, float]:
    """Best write and read MB/s of ``rows`` stored with ``codecs``, and the stored bytes."""
    best_write = best_read = float("inf")
    stored = 0
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        array = zarr.create_array(
            str(folder), shape=rows.shape, chunks=(CHUNK_ROWS, ROW), dtype="float32", compressors=codecs
        )
        start = time.perf_counter()
        array[...] = rows
        best_write = min(best_write, time.perf_counter() - start)
        start = time.perf_counter()
        array[...]
        best_read = min(best_read, time.perf_counter() - start)
        stored = int(array.nbytes_stored())
    return {"write_mb_s": rows.nbytes / best_write / 1e6, "read_mb_s": rows.nbytes / best_read / 1e6, "stored": stored}


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = _real_deltas(folder, args.storage, args.mib)
        compressor = make_compressor("auto", StorageMode(args.storage))
        plain = _bandwidth(rows, (compressor,), folder / "plain", args.repeats)
        checked = _bandwidth(rows, checksummed(compressor), folder / "checked", args.repeats)
    step = rows[: 61 * 2**20 // 4 // ROW]  # one VGG-16 step's deltas (about 61 MB)
    start = time.perf_counter()
    for _ in range(args.repeats):
        np.isfinite(step).all()
    isfinite_ms = (time.perf_counter() - start) / args.repeats * 1e3
    result = {
        "benchmark": "crc32c checksum per chunk and per-step non-finite check: cost in one run",
        "command": f"python benchmarks/checksums.py --mib {args.mib} --repeats {args.repeats} --storage {args.storage}",
        "storage": args.storage,
        "mib": args.mib,
        "without_checksum": plain,
        "with_checksum": checked,
        "write_ratio": checked["write_mb_s"] / plain["write_mb_s"],
        "read_ratio": checked["read_mb_s"] / plain["read_mb_s"],
        "extra_bytes": checked["stored"] - plain["stored"],
        "isfinite_ms_per_61mb_step": isfinite_ms,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for label, r in (("without crc32c", plain), ("with crc32c", checked)):
        print(f"{label:>15}: write {r['write_mb_s']:.0f} MB/s, read {r['read_mb_s']:.0f} MB/s, {r['stored']} bytes")
    print(
        f"checksum: write x{result['write_ratio']:.3f}, read x{result['read_ratio']:.3f}, "
        f"+{result['extra_bytes']} bytes; isfinite {isfinite_ms:.1f} ms per 61 MB step"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
