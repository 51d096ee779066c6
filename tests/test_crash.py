"""Crash safety and resume, with real processes killed by SIGKILL (the in-process contract is in
test_trace_contract.py; the DDP run in test_sampler.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_matches_snapshots,
    committed,
    finish,
    kill,
    replay_error_feedback,
    replay_power_steps,
    start_run,
)

from lightning_tracetrain import Trace
from lightning_tracetrain.trace.lease import lease_path

pytestmark = pytest.mark.slow


def _wait(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError("run ended early ({}): {}".format(*finish(proc)))
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError("run did not get there in time")
        time.sleep(0.01)


def _snapshot(out: Path, k: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "snaps" / f"step_{k}.pt")


@pytest.mark.parametrize(("extra_delay", "storage"), [(0.0, "lossless"), (0.013, "compact"), (0.029, "factored")])
def test_sigkill_leaves_every_committed_step(tmp_path, extra_delay, storage):
    proc = start_run(tmp_path, "--max-steps", "400", "--sleep", "0.01", "--storage", storage)
    _wait(proc, lambda: committed(tmp_path / "trace") >= 4)
    time.sleep(extra_delay)  # kill at different moments of the write cycle
    kill(proc)

    trace = Trace(tmp_path / "trace")
    k = trace.num_steps
    assert k >= 4
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(k))
    assert len(trace.examples.index) == trace.steps.example_stop[-1] == 8 * k
    _assert_steps(trace, tmp_path, range(k + 1))  # initial + deltas == weights after every committed step
    assert trace.spec.factored == (("fc",) if storage == "factored" else ())
    if storage == "factored":
        assert len(trace.factors("fc").inputs) == 8 * k


@pytest.mark.parametrize("storage", ["compact", "lowrank"])
def test_resume_after_kill_continues_without_gap_and_keeps_its_carry(tmp_path, storage):
    """Killed, then resumed from an older checkpoint: no gap, no duplicate, and every stored step is still
    bit for bit the error feedback of the exact steps (compact: the checkpoint kept the rounding carry) or the
    power iteration over them (lowrank: it kept the residual and the warm start)."""
    proc = start_run(tmp_path, "--max-steps", "400", "--sleep", "0.02", "--storage", storage)
    _wait(proc, lambda: len(list((tmp_path / "ckpt").glob("*.ckpt"))) >= 3)
    kill(proc)
    killed_at = Trace(tmp_path / "trace").num_steps
    assert Path(lease_path(str(tmp_path / "trace"))).exists()  # the killed run's lease: its process is gone

    ckpts = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    loadable = [p for p in ckpts if _loads(p)]  # the kill may have cut the newest one short
    assert all(killed_at >= int(p.stem.split("=")[1]) for p in loadable)  # a checkpoint is never ahead of its trace
    resume_from = loadable[-2]  # an older one: the trace holds steps past it, which must be dropped
    ckpt_step = int(resume_from.stem.split("=")[1])
    assert killed_at > ckpt_step

    proc = start_run(tmp_path, "--max-steps", "30", "--resume", str(resume_from), "--storage", storage)
    code, error = finish(proc)
    assert code == 0, error

    trace = Trace(tmp_path / "trace")
    assert trace.num_steps == 30 and not Path(lease_path(str(tmp_path / "trace"))).exists()  # taken over, released
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(30))  # no gap, no duplicate
    # steps up to the checkpoint come from the first run, the rest from the resumed one (its snapshots)
    _assert_steps(trace, tmp_path, range(31))


def _assert_steps(trace: Trace, out: Path, steps: range) -> None:
    """The trace against the weight snapshots: exactly, or for compact bit for bit the error feedback of the
    snapshots' differences (the exact steps) and within one step's rounding of the weights."""
    snapshots = {k: _snapshot(out, k) for k in steps}
    if trace.storage == "lowrank":
        _assert_lowrank_steps(trace, snapshots)
        return
    if trace.storage != "compact":
        assert_matches_snapshots(trace, snapshots)
        return
    keepbits, bound = trace.spec.keepbits, {}
    for layer in trace.layers:
        for param, stored in trace.deltas(layer).items():
            key = f"{layer}.{param}"
            exact = torch.stack([snapshots[k + 1][key] - snapshots[k][key] for k in steps if k + 1 in snapshots])
            assert torch.equal(stored, replay_error_feedback(exact, keepbits)), key
            bound[key] = 2.0**-keepbits * exact.abs().max(0).values
    assert_matches_snapshots(trace, snapshots, bound=bound)


def _assert_lowrank_steps(trace: Trace, snapshots: dict[int, dict[str, torch.Tensor]]) -> None:
    """Biases and small layers exactly; each low-rank step bit for bit a power iteration over the exact step;
    the final weights with the residual the run wrote at its end."""
    assert trace.spec.lowrank == ("fc",)  # rank 8: conv (4 x 9) and head (3 x 16) are smaller as they are
    last = max(snapshots)
    for layer in trace.layers:
        for param, stored in trace.read_chunk(layer)[0].items():
            key = f"{layer}.{param}"
            exact = torch.stack([snapshots[k + 1][key] - snapshots[k][key] for k in range(last)])
            assert torch.equal(stored, exact), key
    factors = trace.read_chunk("fc")[1]
    exact = torch.stack([snapshots[k + 1]["fc.weight"] - snapshots[k]["fc.weight"] for k in range(last)])
    p, q = replay_power_steps(exact, trace.spec.rank)
    assert torch.equal(factors.p, p) and torch.equal(factors.q, q)
    assert trace.residual("fc")[0] == last
    torch.testing.assert_close(trace.final("fc")["weight"], snapshots[last]["fc.weight"], atol=1e-6, rtol=1e-6)


def _loads(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except Exception:
        return False
    return True
