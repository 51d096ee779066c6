"""The projection of a trace's size at fit start, against the free space where it goes (a warning, never an error)."""

from __future__ import annotations

import shutil
import warnings
from collections import namedtuple

import pytest
from conftest import TinyCNN, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.recording.layers import layer_parameters
from lightning_tracetrain.recording.space import projected_bytes, space_warning, step_bytes
from lightning_tracetrain.workloads.config import build

Usage = namedtuple("Usage", "total used free")
LAYERS = {"conv": 1_000, "fc": 40_000, "head": 200_000}  # float32 bytes of each layer's parameters


def _free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free + 1, 9 * free + 1, free))


def test_projection_bounds_the_size_of_a_real_run(tmp_path):
    """The digits workload for 12 steps: the stored deltas lie between the projection's bounds."""
    model, datamodule = build("digits")
    trainer = quiet_trainer(max_steps=12, use_distributed_sampler=False, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(model, datamodule)
    trace = Trace(tmp_path / "t")
    modules = dict(model.named_modules())
    sizes = {n: 4 * sum(p.numel() for p in layer_parameters(modules[n]).values()) for n in trace.layers}
    low, high = projected_bytes(sizes, trace.num_steps, "lossless")
    nbytes = trace.nbytes()
    assert high == nbytes["raw"]  # float32 deltas of every step, exactly
    assert low <= nbytes["stored"] <= high
    assert projected_bytes(sizes, 10, "compact") == (low / 12 * 10 / 4, high / 12 * 10 / 4)


def test_the_warning_names_what_would_fit(tmp_path, monkeypatch):
    steps = 100
    _free(monkeypatch, 5_000_000)  # lossless needs 12.05 MB at 2x, compact 3.0 MB: compact fits
    text = space_warning(LAYERS, steps, "lossless", str(tmp_path / "trace"))
    assert text is not None and "will not fit" in text and str(tmp_path / "trace") in text
    assert "storage='compact'" in text and "layers=['conv', 'fc']" in text  # the smallest layers that fit
    assert "4.8 MiB are free" in text
    _free(monkeypatch, 100)
    assert "no choice of mode or layers fits" in space_warning(LAYERS, steps, "lossless", str(tmp_path))


def test_no_warning_when_it_fits_or_cannot_be_projected(tmp_path, monkeypatch):
    _free(monkeypatch, 10**12)
    assert space_warning(LAYERS, 100, "lossless", str(tmp_path)) is None
    _free(monkeypatch, 1)
    assert space_warning(LAYERS, float("inf"), "lossless", str(tmp_path)) is None  # max_epochs=-1: unbounded
    assert space_warning(LAYERS, 100, "lossless", "s3://bucket/trace") is None  # object storage: no free space
    assert space_warning(LAYERS, 100, "factored", str(tmp_path)) is None  # per-example factors: other sizes


def test_fit_warns_at_start_and_still_records_every_step(tmp_path, monkeypatch):
    _free(monkeypatch, 1000)
    trainer = quiet_trainer(max_epochs=2, callbacks=[TraceCallback(tmp_path / "t")])
    with pytest.warns(UserWarning, match=r"will not fit at .* 10 steps of"):
        trainer.fit(TinyCNN(), image_loader(n=40, batch_size=8))
    assert Trace(tmp_path / "t").num_steps == 10  # a warning, not an error: the run is recorded
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        quiet_trainer(max_epochs=1, callbacks=[TraceCallback(tmp_path / "u")]).fit(TinyCNN(), image_loader(n=16))


def test_lowrank_steps_are_projected_as_their_factors(tmp_path, monkeypatch):
    model = TinyCNN()
    layers = {"conv": model.conv, "fc": model.fc, "head": model.head}
    dense = step_bytes(layers, "lossless")
    assert dense == {n: 4 * sum(p.numel() for p in layer_parameters(m).values()) for n, m in layers.items()}
    low = step_bytes(layers, "lowrank", rank=1)  # every weight pays at rank 1; biases stay deltas
    assert low == {"conv": 4 * (4 + 9 + 4), "fc": 4 * (8 + 36 + 8), "head": 4 * (3 + 8)}
    _free(monkeypatch, 200_000)  # lossless needs at least 720 kB, rank-1 factors 160 kB
    text = space_warning(dense, 1000, "lossless", str(tmp_path), lowrank_bytes=sum(low.values()))
    assert text is not None and "storage='lowrank'" in text
