"""Crash safety and resume, with real processes killed by SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from lightning_tracetrain import Trace

SCRIPT = Path(__file__).with_name("trace_run.py")
pytestmark = pytest.mark.slow


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _committed(path: Path) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r").attrs.get("steps_committed", -1))
    except (FileNotFoundError, ValueError):
        return -1


def _wait(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("run did not get there in time")
        time.sleep(0.01)


def _snapshot(out: Path, k: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "snaps" / f"step_{k}.pt")


def _assert_matches_snapshots(trace: Trace, out: Path, steps: list[int]) -> None:
    for k in steps:
        for layer, params in trace.weights_at(k).items():
            for param, value in params.items():
                torch.testing.assert_close(value, _snapshot(out, k)[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra_delay", "storage"), [(0.0, "lossless"), (0.013, "lossless"), (0.029, "lossless"), (0.013, "factored")]
)
def test_sigkill_leaves_every_committed_step(tmp_path, extra_delay, storage):
    proc = _start(tmp_path, "--max-steps", "400", "--sleep", "0.01", "--storage", storage)
    _wait(proc, lambda: _committed(tmp_path / "trace") >= 4)
    time.sleep(extra_delay)  # kill at different moments of the write cycle
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    trace = Trace(tmp_path / "trace")
    k = trace.num_steps
    assert k >= 4
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(k))
    assert len(trace.examples.index) == trace.steps.example_stop[-1] == 8 * k
    _assert_matches_snapshots(trace, tmp_path, [0, 1, k // 2, k])  # initial + deltas == weights after step k
    if storage == "factored":
        assert trace.spec.factored == ("fc",) and len(trace.factors("fc").inputs) == 8 * k


@pytest.mark.parametrize("storage", ["lossless", "factored"])
def test_resume_after_kill_continues_without_gap_or_duplicate(tmp_path, storage):
    proc = _start(tmp_path, "--max-steps", "400", "--sleep", "0.02", "--storage", storage)
    _wait(proc, lambda: len(list((tmp_path / "ckpt").glob("*.ckpt"))) >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = Trace(tmp_path / "trace").num_steps

    ckpts = sorted((tmp_path / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    loadable = [p for p in ckpts if _loads(p)]  # the kill may have cut the newest one short
    assert all(killed_at >= int(p.stem.split("=")[1]) for p in loadable)  # a checkpoint is never ahead of its trace
    resume_from = loadable[-2]  # an older one: the trace holds steps past it, which must be dropped
    ckpt_step = int(resume_from.stem.split("=")[1])
    assert killed_at > ckpt_step

    proc = _start(tmp_path, "--max-steps", "30", "--resume", str(resume_from), "--storage", storage)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]

    trace = Trace(tmp_path / "trace")
    assert trace.num_steps == 30
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(30))  # no gap, no duplicate
    final = torch.load(tmp_path / "final.pt")
    for layer in trace.layers:
        for param, value in trace.final(layer).items():
            torch.testing.assert_close(value, final[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)
    # steps up to the checkpoint come from the first run, the rest from the resumed one
    _assert_matches_snapshots(trace, tmp_path, [ckpt_step - 1, ckpt_step, ckpt_step + 1, 29])
    assert trace.spec.factored == (("fc",) if storage == "factored" else None)
    if storage == "factored":
        assert trace.factors("fc").counts.tolist() == list(np.diff(trace.steps.example_stop, prepend=0))


def _loads(path: Path) -> bool:
    try:
        torch.load(path, weights_only=False)
    except Exception:
        return False
    return True


def test_ddp_rank_zero_writes_the_union_of_all_ranks_examples(tmp_path):
    proc = _start(tmp_path, "--devices", "2", "--epochs", "2", "--max-steps", "-1")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    trace = Trace(tmp_path / "trace")
    assert trace.num_steps == 6  # 48 examples, 24 per rank, batches of 8: 3 steps per epoch
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(6))
    sizes = trace.steps.example_stop - trace.steps.example_start
    np.testing.assert_array_equal(sizes, [16] * 6)  # both ranks' batches
    for epoch in (0, 1):
        ids = np.concatenate([trace.step_examples(t).index for t in range(3 * epoch, 3 * epoch + 3)])
        assert sorted(ids.tolist()) == list(range(48))
    final = torch.load(tmp_path / "final.pt")
    for layer in trace.layers:
        for param, value in trace.final(layer).items():
            torch.testing.assert_close(value, final[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)
