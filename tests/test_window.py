"""The trace writer's chunk windows, and the inline writer (CPU training into a local trace) against the threaded
one: the same trace, byte for byte."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import TinyCNN

from lightning_tracetrain import Trace
from lightning_tracetrain.recording import recorder as recorder_module
from lightning_tracetrain.recording.classes import class_spec
from lightning_tracetrain.recording.layers import select_layers
from lightning_tracetrain.recording.recorder import RecorderOptions, StepInfo, TraceRecorder
from lightning_tracetrain.recording.staging import DeltaStager
from lightning_tracetrain.trace.window import StepWindows

SHAPES = [(3, 2), (4,)]


def _stage(stager: DeltaStager, after: list[torch.Tensor]) -> object:
    return stager.stage(after, [torch.zeros_like(a) for a in after])


@pytest.mark.parametrize("direct", [False, True])
def test_a_step_lands_in_its_row_of_every_block(direct):
    windows = StepWindows(SHAPES, chunk=3, count=1)
    stager = DeltaStager(SHAPES, torch.device("cpu"), slots=2, direct=direct)
    steps = [[torch.full(s, float(10 * i + j)) for j, s in enumerate(SHAPES)] for i in range(3)]
    for row, after in enumerate(steps):
        assert windows.put(0, row, _stage(stager, after)) is False
    blocks = windows.data(0, 3, 3)
    for j in range(len(SHAPES)):
        np.testing.assert_array_equal(blocks[j], np.stack([step[j].numpy() for step in steps]))


def test_non_finite_is_exact_even_when_a_float32_sum_overflows():
    windows = StepWindows(SHAPES, chunk=2, count=1)
    stager = DeltaStager(SHAPES, torch.device("cpu"), slots=2)
    huge = [torch.full(s, 3e38) for s in SHAPES]  # finite values whose float32 sum is infinite
    assert windows.put(0, 0, _stage(stager, huge)) is False
    nan = [torch.zeros(s) for s in SHAPES]
    nan[1][2] = float("nan")
    assert windows.put(0, 1, _stage(stager, nan)) is True


def test_a_partial_window_is_written_with_zeros_after_its_steps_not_an_earlier_chunks():
    windows = StepWindows(SHAPES, chunk=3, count=1)
    stager = DeltaStager(SHAPES, torch.device("cpu"), slots=2)
    for row in range(3):
        windows.put(0, row, _stage(stager, [torch.ones(s) for s in SHAPES]))
    windows.put(0, 0, None)  # the window refilled: a skipped step, then a partial commit of that one step
    for block in windows.data(0, 1, 3):
        assert not block.any()


def test_compact_rows_are_rounded_with_the_carry_of_the_previous_step():
    import numcodecs

    windows = StepWindows(SHAPES, chunk=4, count=1, keepbits=2)
    stager = DeltaStager(SHAPES, torch.device("cpu"), slots=2)
    g = torch.Generator().manual_seed(0)
    steps = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(4)]
    for row, after in enumerate(steps):
        windows.put(0, row, _stage(stager, after))
    carry, rounding = np.zeros(10, np.float32), numcodecs.BitRound(2)
    for row, after in enumerate(steps):  # the reference: one flat step at a time
        value = torch.cat([a.flatten() for a in after]).numpy() + carry
        stored = rounding.encode(value).view(np.float32)
        carry = value - stored
        got = np.concatenate([b[row].ravel() for b in windows.data(0, 4, 4)])
        np.testing.assert_array_equal(got, stored)
    np.testing.assert_array_equal(windows.carry, carry)


def _record(path: Path, inline: bool, monkeypatch: pytest.MonkeyPatch, build_s: float = 0.0) -> None:
    monkeypatch.setattr(TraceRecorder, "_inline", property(lambda self: inline))
    prepare = recorder_module.prepare

    def slow(*args: Any) -> Path:
        time.sleep(build_s)  # the first step arrives while the trace is built
        return prepare(*args)

    monkeypatch.setattr(recorder_module, "prepare", slow)
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = TraceRecorder(RecorderOptions(str(path), chunk_steps=3))
    recorder.start(select_layers(model), module=class_spec(model), optimizers=[opt])
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        recorder.add_examples(np.arange(2) + 2 * step, np.zeros(2, np.int64), np.zeros(2, bool))
        recorder.record(StepInfo(step, 0, step, [0.1]))
        if step == 4:
            recorder.commit()  # a partial commit of a chunk, later rewritten whole
    recorder.close()


@pytest.mark.parametrize("build_s", [0.0, 1.0], ids=["built", "slow-build"])
def test_the_inline_writer_writes_the_threaded_writers_trace(tmp_path, monkeypatch, build_s):
    _record(tmp_path / "threaded", False, monkeypatch)
    _record(tmp_path / "inline", True, monkeypatch, build_s)  # 1 s: the first step waits for the build
    threaded, inline = Trace(tmp_path / "threaded"), Trace(tmp_path / "inline")
    assert threaded.num_steps == inline.num_steps == 8
    np.testing.assert_array_equal(inline.steps.global_step, np.arange(8))
    for path in threaded.spec.step_value_paths():
        a = zarr.open_array(str(tmp_path / "threaded" / path), mode="r")
        b = zarr.open_array(str(tmp_path / "inline" / path), mode="r")
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:], b[:])
    for step in (0, 8):
        for layer, params in threaded.weights_at(step).items():
            for name, value in params.items():
                torch.testing.assert_close(inline.weights_at(step)[layer][name], value, rtol=0, atol=0)
