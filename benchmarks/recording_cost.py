"""Where a traced step's time goes: a cost model of the recording path, and the recorder's throughput.

Measured on real deltas (the digits-wide CNN of ``overhead.py`` trained with SGD on shuffled
digits), without training in between, one stage at a time:

- per step (ms) and per MB of deltas (ms/MB): computing the deltas straight into the chunk
  window (what the inline writer does on CPU), the non-finite check, the staging slot and
  its copy into the window (the threaded writer's path, for GPUs and remote stores),
  encoding a chunk (per codec and Blosc thread count), its crc32c, writing the bytes to new
  files (what a trace does), and to new files after deleting as many (pages just freed), zarr's
  own path for the same chunk (encode + checksum + write + bookkeeping) and the recorder's
  (whole chunks encoded outside zarr, then stored);
- per commit: the attributes update that commits the steps;
- once per run: starting, building the trace (in the background), its first step, closing it.

Then the recorder as a whole (``TraceRecorder.record`` in a loop, the weights changed in
place between steps as an optimizer would) gives the sustained throughput in MB of deltas per
second, against the bound of one memcpy plus the chosen codec on one core (the core a 2-core
machine leaves it while training uses the other), and against that bound plus writing the
encoded bytes to new files at the speed measured here.

    python benchmarks/recording_cost.py [--steps 400] [--compressor auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import torch
import zarr
from sklearn.datasets import load_digits
from zarr.core.sync import sync

from lightning_tracetrain.recording.classes import class_spec
from lightning_tracetrain.recording.layers import layer_parameters, select_layers
from lightning_tracetrain.recording.recorder import RecorderOptions, StepInfo, TraceRecorder
from lightning_tracetrain.recording.staging import DeltaStager, DirectDeltas
from lightning_tracetrain.trace.chunks import ChunkEncoder, store_chunks
from lightning_tracetrain.trace.codecs import make_compressor
from lightning_tracetrain.trace.schema import StorageMode
from lightning_tracetrain.trace.window import StepWindows, all_finite
from lightning_tracetrain.workloads.models import DigitsCNN

MB = 2**20


def real_steps(steps: int, seed: int = 0) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    """The digits-wide model after training, and the parameter deltas of its last ``steps`` SGD steps."""
    torch.manual_seed(seed)
    model = DigitsCNN(channels=32, hidden=128)
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.as_tensor(digits.target)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    layers = select_layers(model)
    params = [p for m in layers.values() for p in layer_parameters(m).values()]  # the recorder's order
    out: list[list[torch.Tensor]] = []
    g = torch.Generator().manual_seed(seed)
    while len(out) < steps:
        for batch in torch.randperm(len(x), generator=g).split(32):
            before = [p.detach().clone() for p in params]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append([p.detach() - b for p, b in zip(params, before, strict=True)])
            if len(out) == steps:
                break
    return model, out


def _time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage_costs(deltas: list[list[torch.Tensor]], chunk: int, tmp: str) -> dict[str, Any]:
    """Seconds per step of each stage of the recording path, measured alone."""
    shapes = [d.shape for d in deltas[0]]
    after = [d.clone() for d in deltas[0]]
    before = [torch.zeros_like(d) for d in deltas[0]]
    step_bytes = sum(d.numel() for d in deltas[0]) * 4
    stager = DeltaStager(shapes, torch.device("cpu"), slots=2)
    windows = StepWindows([tuple(s) for s in shapes], chunk, count=1)
    rows = [torch.from_numpy(block) for block in windows.data(0, chunk, chunk)]
    arrays = [block[0] for block in windows.data(0, chunk, chunk)]

    def direct() -> None:  # the inline writer: deltas straight into a row of the window
        for row in range(chunk):
            DirectDeltas(after, before, ()).write([r[row] for r in rows])

    def staged() -> None:  # the threaded writer: into a staging slot, then copied into the window
        for row in range(chunk):
            slot = stager.stage(after, before)
            slot.write([r[row] for r in rows])
            slot.release()

    flat = [torch.cat([d.flatten() for d in step]).numpy() for step in deltas[:chunk]]
    window = np.zeros((chunk, flat[0].size), dtype=np.float32)
    costs: dict[str, Any] = {"step_mb": step_bytes / MB, "chunk_steps": chunk}
    costs["deltas_ms"] = 1000 * _time(direct) / chunk
    costs["nonfinite_ms"] = 1000 * _time(lambda: [[all_finite(a) for a in arrays] for _ in range(chunk)]) / chunk
    costs["staged_copy_ms"] = 1000 * _time(staged) / chunk
    costs["memcpy_ms"] = 1000 * _time(lambda: [np.copyto(window[r], flat[r]) for r in range(chunk)]) / chunk
    per_array = [np.stack([step[i].numpy() for step in deltas[:chunk]]) for i in range(len(shapes))]
    encodings: dict[str, Any] = {}
    for name in ("lz4", "zstd", "lz4-byteshuffle", "lz4hc-1", "none"):
        for threads in (1, 2):
            if name == "none" and threads == 2:
                continue
            codec = _blosc(name)
            numcodecs.blosc.set_nthreads(threads)
            numcodecs.blosc.use_threads = threads > 1
            encoded = [codec.encode(a) if codec is not None else a.tobytes() for a in per_array]
            seconds = _time(lambda c=codec: [c.encode(a) for a in per_array] if c is not None else None)
            encodings[f"{name}/{threads}"] = {
                "ms_per_step": 1000 * seconds / chunk,
                "ms_per_mb": 1000 * seconds / (chunk * step_bytes / MB),
                "ratio": sum(len(e) for e in encoded) / (chunk * step_bytes),
            }
    numcodecs.blosc.use_threads = None
    costs["encode"] = encodings
    encoded = [_blosc("lz4").encode(a) for a in per_array]
    costs["crc32c_ms"] = 1000 * _time(lambda: [google_crc32c.value(e) for e in encoded]) / chunk
    path = Path(tmp) / "raw"
    path.mkdir(exist_ok=True)

    written = iter(range(10**6))

    def write(free: bool) -> None:  # each call writes new files; ``free``: after deleting the previous call's
        run = next(written)
        for i, e in enumerate(encoded):
            if free:
                (path / f"{run - 1}-{i}").unlink(missing_ok=True)
            (path / f"{run}-{i}").write_bytes(e)

    costs["file_write_ms"] = 1000 * _time(lambda: write(False)) / chunk  # pages the kernel must find
    costs["file_write_freed_ms"] = 1000 * _time(lambda: write(True)) / chunk  # into pages it just got back
    group = zarr.open_group(f"{tmp}/zarr", mode="w")
    compressor = make_compressor("auto", StorageMode.lossless)
    arrays = [
        group.create_array(
            str(i), shape=a.shape, chunks=a.shape, dtype="float32", compressors=(compressor, zarr.codecs.Crc32cCodec())
        )
        for i, a in enumerate(per_array)
    ]

    def zarr_write() -> None:
        for arr, a in zip(arrays, per_array, strict=True):
            arr[:] = a

    costs["zarr_write_ms"] = 1000 * _time(zarr_write) / chunk
    encoders = [ChunkEncoder.for_array(arr) for arr in arrays]

    def direct_write() -> None:  # the recorder's path: whole chunks encoded here, then stored
        for arr, encoder, a in zip(arrays, encoders, per_array, strict=True):
            sync(store_chunks(arr, encoder.encode_chunks(0, a)))

    costs["direct_write_ms"] = 1000 * _time(direct_write) / chunk
    costs["attrs_update_ms_per_commit"] = 1000 * _time(lambda: group.update_attributes({"steps_committed": 1}))
    return costs


def _blosc(name: str) -> numcodecs.abc.Codec | None:
    if name == "none":
        return None
    cname, _, variant = name.partition("-")
    shuffle = numcodecs.Blosc.SHUFFLE if variant == "byteshuffle" else numcodecs.Blosc.BITSHUFFLE
    clevel = {"zstd": 1, "lz4hc": 1}.get(cname, 5)
    return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)


def recorder_run(
    model: torch.nn.Module, deltas: list[list[torch.Tensor]], path: str, compressor: str
) -> dict[str, float]:
    """The recorder alone: ``record`` per step with the weights changed in place between steps."""
    layers = select_layers(model)
    params = [p for m in layers.values() for p in layer_parameters(m).values()]  # the recorder's order
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    index, ghost = np.arange(32), np.zeros(32, bool)
    label = np.zeros(32, np.int64)

    def apply(step: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_add_(params, step)

    apply_s = _time(lambda: [apply(step) for step in deltas], repeats=3)
    recorder = TraceRecorder(RecorderOptions(path, compressor=compressor, overwrite=True))
    t0 = time.perf_counter()
    recorder.start(layers, module=class_spec(model), optimizers=[opt])
    started = time.perf_counter()
    if recorder._prepared is not None:  # the trace is built in the background from start(): time it alone
        recorder._prepared.result()
    built = time.perf_counter()
    recorder.add_examples(index, label, ghost)
    recorder.record(StepInfo(0, 0, 0, [0.05]))  # moves the trace into place
    created = time.perf_counter()
    for i, step in enumerate(deltas, start=1):
        apply(step)
        recorder.add_examples(index, label, ghost)
        recorder.record(StepInfo(i, 0, i, [0.05]))
    recorder.commit()
    looped = time.perf_counter()
    recorder.close()
    closed = time.perf_counter()
    step_mb = sum(d.numel() for d in deltas[0]) * 4 / MB
    loop_s = looped - created - apply_s
    return {
        "start_s": started - t0,
        "build_s": built - started,  # in the background, while the run starts up
        "first_step_s": created - built,
        "close_s": closed - looped,
        "ms_per_step": 1000 * loop_s / len(deltas),
        "mb_per_s": step_mb * len(deltas) / loop_s,
    }


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--compressor", default="auto", choices=["auto", "lz4", "zstd", "none"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recording_cost_cpu.json"))
    return parser


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(1)  # the recorder's share of a 2-core machine: one core
    model, deltas = real_steps(args.steps)
    step_mb = sum(d.numel() for d in deltas[0]) * 4 / MB
    chunk = int(max(1, min(256, 32 * MB // (step_mb * MB))))
    with tempfile.TemporaryDirectory() as tmp:
        costs = stage_costs(deltas, chunk, tmp)
        runs = [recorder_run(model, deltas, f"{tmp}/trace{r}", args.compressor) for r in range(3)]
    codec = {"auto": "lz4", "lz4": "lz4", "zstd": "zstd", "none": "none"}[args.compressor]
    bound_ms = costs["memcpy_ms"] + costs["encode"][f"{codec}/1"]["ms_per_step"]
    ratio = costs["encode"][f"{codec}/1"]["ratio"] / costs["encode"]["lz4/1"]["ratio"]  # the writes measured lz4's
    with_write_ms = bound_ms + costs["file_write_ms"] * ratio
    recorder = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "benchmark": "recording cost model, digits-wide deltas",
        "command": f"python benchmarks/recording_cost.py --steps {args.steps} --compressor {args.compressor}",
        "stages": costs,
        "recorder": recorder,
        "bound_ms_per_step": bound_ms,
        "bound_mb_per_s": step_mb / bound_ms * 1000,
        "throughput_over_bound": recorder["mb_per_s"] / (step_mb / bound_ms * 1000),
        "bound_with_write_mb_per_s": step_mb / with_write_ms * 1000,
        "throughput_over_bound_with_write": recorder["mb_per_s"] / (step_mb / with_write_ms * 1000),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
