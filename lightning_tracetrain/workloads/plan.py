"""``python -m lightning_tracetrain plan --config CONFIG``: how large this run's trace will be, and whether it fits.

Builds the config's model and datamodule, counts the run's optimizer steps the
way its Trainer will (``estimated_stepping_batches``), and trains a few real
steps with every storage mode traced at once (``factored`` in a run of its own,
when the optimizer allows it), so each layer's stored bytes per step are
measured rather than guessed. It then projects each mode's trace size, compares
it with the free space where the config writes the trace, and times reading a
chunk of the measured steps, of the size a real run writes, to say how long one
explanation pass would spend reading each projected trace. A warning (not an error) names the mode or ``layers=`` choice
that would fit.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import zarr

from lightning_tracetrain.console import add_debug_flag, command
from lightning_tracetrain.explain.arguments import dataclass_parser, option, parse
from lightning_tracetrain.explain.loading import Trust
from lightning_tracetrain.recording import TraceCallback
from lightning_tracetrain.recording.space import free_bytes
from lightning_tracetrain.trace import StorageMode, Trace
from lightning_tracetrain.trace.codecs import checksummed, make_compressor
from lightning_tracetrain.trace.summary import format_bytes
from lightning_tracetrain.trainer import quiet_logs, quiet_trainer
from lightning_tracetrain.workloads.config import build, load_config

_TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches", "limit_train_batches", "precision")


@dataclass
class PlanArguments:
    """Project a config's trace size per storage mode from a few measured steps, against the free space."""

    config: str = option("a LightningCLI config (configs/NAME.yaml or a path)")
    measure_steps: int = option("real optimizer steps to measure (stored bytes and read speed)", 4)
    rank: int = option("the rank of storage='lowrank'", 8)
    dirpath: str | None = option("where the trace will go (default: the config's trace.init_args.dirpath)", None)
    max_epochs: int | None = option("override the config's trainer.max_epochs", None)
    max_steps: int | None = option("override the config's trainer.max_steps", None)
    trust_module: list[str] = option(
        "import classes of this module prefix that the config names (repeatable)", [], action="append"
    )
    out: str | None = option("also write the plan as JSON to this file", None)

    def __post_init__(self) -> None:
        if self.measure_steps < 1 or self.rank < 1:
            raise ValueError("--measure-steps and --rank must be at least 1.")


@dataclass
class ModePlan:
    """One storage mode: measured stored bytes per step, per layer (empty with ``unavailable``: why not)."""

    step_bytes: dict[str, float] = field(default_factory=dict)
    unavailable: str = ""

    @property
    def per_step(self) -> float:
        return sum(self.step_bytes.values())


@dataclass
class Plan:
    """The projection: steps, where, free space, read speed, and each mode's bytes per step."""

    steps: int
    dirpath: str
    free: int | None
    read_bytes_per_s: float
    modes: dict[str, ModePlan]
    configured: str = "lossless"
    rank: int = 8

    def projected(self, mode: str) -> float:
        """Stored bytes of the steps' deltas (or factors) under ``mode``."""
        return self.modes[mode].per_step * self.steps

    def read_seconds(self, mode: str) -> float:
        """Seconds one explanation pass spends reading (and decoding) the projected trace."""
        return self.projected(mode) / self.read_bytes_per_s

    def fits(self, mode: str) -> bool:
        return self.free is None or self.projected(mode) <= self.free

    def warning(self) -> str | None:
        """A warning when the configured mode's projection exceeds the free space, naming what would fit."""
        mode = self.configured
        if self.fits(mode):
            return None
        options = [f"storage='{m}' ({format_bytes(self.projected(m))})" for m, p in self.modes.items()
                   if not p.unavailable and m != mode and self.fits(m)]  # fmt: skip
        kept, total = [], 0.0
        for name, size in sorted(self.modes[mode].step_bytes.items(), key=lambda kv: kv[1]):
            total += size * self.steps
            if self.free is not None and total > self.free:
                break
            kept.append(name)
        if kept:
            options.append(f"layers={kept}")
        advice = " or ".join(options) or "a disk with more free space"
        return (
            f"The trace will not fit at {self.dirpath}: {self.steps} steps need {format_bytes(self.projected(mode))} "
            f"with storage='{mode}', and {format_bytes(self.free or 0)} are free. It would fit with {advice}."
        )

    def markdown(self) -> str:
        free = "unknown (object storage)" if self.free is None else format_bytes(self.free)
        lines = [
            f"{self.steps} optimizer steps; trace at {self.dirpath} ({free} free); "
            f"reading at {format_bytes(self.read_bytes_per_s)}/s (measured)",
            "",
            "| storage | per step | projected trace | fits | read time of one explanation pass |",
            "|---|---|---|---|---|",
        ]
        for mode, p in self.modes.items():
            name = f"lowrank (rank {self.rank})" if mode == StorageMode.lowrank else mode
            if p.unavailable:
                lines.append(f"| {name} | n/a | n/a | n/a | {p.unavailable} |")
                continue
            lines.append(
                f"| {name} | {format_bytes(p.per_step)} | {format_bytes(self.projected(mode))} | "
                f"{'yes' if self.fits(mode) else 'NO'} | {_duration(self.read_seconds(mode))} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "modes"},
            "modes": {
                m: {**asdict(p), "per_step": p.per_step, "projected": self.projected(m), "read_s": self.read_seconds(m)}
                for m, p in self.modes.items()
            },
        }


class _Probe(pl.Callback):
    """Notes the run's optimizer steps at fit start and stops training after ``steps`` of them."""

    def __init__(self, steps: int) -> None:
        self.stop_after, self.total = steps, 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total = int(trainer.estimated_stepping_batches) if math.isfinite(trainer.estimated_stepping_batches) else 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        trainer.should_stop = trainer.global_step >= self.stop_after


def plan(args: PlanArguments) -> Plan:
    """Measure ``args.measure_steps`` real steps of the config under every storage mode and project the run."""
    config = load_config(args.config)
    trust = Trust(tuple(args.trust_module))
    settings = {k: v for k, v in (config.get("trainer") or {}).items() if k in _TRAINER_KEYS}
    settings |= {k: v for k, v in (("max_epochs", args.max_epochs), ("max_steps", args.max_steps)) if v is not None}
    trace_args = ((config.get("trace") or {}).get("init_args")) or {}
    dirpath = args.dirpath or str(trace_args.get("dirpath", "runs/trace"))
    modes = {StorageMode.lossless: {}, StorageMode.compact: {}, StorageMode.lowrank: {"rank": args.rank}}
    with tempfile.TemporaryDirectory() as tmp, quiet_logs():
        probe = _Probe(args.measure_steps)
        measured = _measure(args, trust, settings, probe, {str(m): kw for m, kw in modes.items()}, Path(tmp))
        try:
            measured |= _measure(args, trust, settings, _Probe(args.measure_steps), {"factored": {}}, Path(tmp))
        except (ValueError, NotImplementedError) as exc:  # not plain SGD, clipping, several processes...
            measured["factored"] = ModePlan(unavailable=str(exc).split(". ")[0])
        speed = _read_speed(Trace(Path(tmp) / "lossless"))
    return Plan(
        steps=probe.total,
        dirpath=dirpath,
        free=free_bytes(dirpath),
        read_bytes_per_s=speed,
        modes=measured,
        configured=str(trace_args.get("storage", "lossless")),
        rank=args.rank,
    )


def _measure(
    args: PlanArguments,
    trust: Trust,
    settings: dict[str, Any],
    probe: _Probe,
    modes: dict[str, dict[str, Any]],
    folder: Path,
) -> dict[str, ModePlan]:
    """Train until ``probe`` stops, traced once per mode; each layer's stored bytes per step."""
    pl.seed_everything(0, verbose=False)
    model, datamodule = build(args.config, trust=trust)
    steps = args.measure_steps
    callbacks = [
        TraceCallback(folder / mode, storage=mode, chunk_steps=steps, overwrite=True, **kw)
        for mode, kw in modes.items()
    ]
    quiet_trainer(**{"max_epochs": 1, **settings}, callbacks=[*callbacks, probe], use_distributed_sampler=False).fit(
        model, datamodule
    )
    out = {}
    for mode in modes:
        trace = Trace(folder / mode)
        out[mode] = ModePlan({name: _chunk_bytes(trace, name) / trace.num_steps for name in trace.layers})
    return out


def _chunk_bytes(trace: Trace, layer: str) -> int:
    """Bytes of a layer's stored steps (deltas, factors or products): the chunk files of its step-axis arrays,
    without their metadata documents (the initial weights and the residual do not grow with the steps)."""
    arrays = [Path(trace.path, p) for p in trace.spec.step_axis_paths() if p.startswith(f"layers/{layer}/")]
    return sum(f.stat().st_size for folder in arrays for f in (folder / "c").rglob("*") if f.is_file())


def _read_speed(trace: Trace, seconds: float = 0.3) -> float:
    """Stored bytes per second that reading and decoding chunks of the size a real run writes achieves here.

    The measured steps (scaled a little per row, so no row repeats another) fill one chunk of about 32 MiB,
    stored with the trace's codecs in a scratch folder beside it and read back until ``seconds`` have passed.
    """
    steps = torch.cat([d.reshape(trace.num_steps, -1) for n in trace.layers for d in trace.deltas(n).values()], 1)
    rows = max(1, min(256, 2**25 // (4 * steps.shape[1])))
    block = steps.repeat((rows + len(steps) - 1) // len(steps), 1)[:rows]
    block *= 1 + 1e-3 * torch.arange(rows, dtype=torch.float32)[:, None]
    codecs = checksummed(make_compressor("auto"))
    array = zarr.create_array(
        store=str(Path(trace.path).with_name("read-speed")), shape=block.shape, chunks=block.shape, dtype="float32",
        compressors=codecs,
    )  # fmt: skip
    array[...] = block.numpy()
    stored, done, start = array.nbytes_stored(), 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        array[...]
        done += stored
    return done / elapsed


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def parser() -> Any:
    return add_debug_flag(dataclass_parser(PlanArguments, "python -m lightning_tracetrain plan", __doc__ or ""))


@command
def main(argv: list[str]) -> Plan:
    args = parse(PlanArguments, parser(), argv)
    result = plan(args)
    print(result.markdown())
    if (text := result.warning()) is not None:
        print(f"\nwarning: {text}")
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    return result


if __name__ == "__main__":
    main()
