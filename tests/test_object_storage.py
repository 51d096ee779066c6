"""Traces on object storage: record, kill, resume and explain against a real S3 server (moto) on loopback."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyCNN, committed, finish, image_loader, kill, quiet_trainer, reset_s3fs, start_run

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.explain import Explainer

pytestmark = pytest.mark.slow


def _run(out: Path, url: str, *args: str) -> subprocess.Popen:
    return start_run(out, "--trace", url, *args)


def _assert_weights(trace: Trace, expected: dict[str, torch.Tensor], step: int) -> None:
    for layer, params in trace.weights_at(step).items():
        for param, value in params.items():
            torch.testing.assert_close(value, expected[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)


def test_record_kill_and_resume_on_s3(s3, tmp_path):
    url = "s3://traces/killed/trace"
    proc = _run(tmp_path, url, "--max-steps", "400", "--sleep", "0.02")
    deadline = time.monotonic() + 180
    while len(list((tmp_path / "ckpt").glob("*.ckpt"))) < 2 or committed(url) < 10:
        assert proc.poll() is None, finish(proc)[1]
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.2)
    kill(proc)

    trace = Trace(url, storage_options=s3)  # explicit options work as well as the environment
    killed_at = trace.num_steps
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(killed_at))
    _assert_weights(trace, torch.load(tmp_path / "snaps" / f"step_{killed_at}.pt"), killed_at)

    resume_from = tmp_path / "ckpt" / "step=5.ckpt"
    proc = _run(tmp_path, url, "--max-steps", "20", "--resume", str(resume_from))
    code, error = finish(proc)
    assert code == 0, error
    trace = Trace(url)
    assert trace.num_steps == 20
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(20))  # no gap, no duplicate
    _assert_weights(trace, torch.load(tmp_path / "final.pt"), 20)
    _assert_weights(trace, torch.load(tmp_path / "snaps" / "step_5.pt"), 5)


def test_explain_a_trace_on_s3_with_a_worker_process(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the explicit storage options know where the server is
    reset_s3fs()
    url = "s3://traces/explained/trace"
    torch.manual_seed(0)
    model = TinyCNN()
    callback = TraceCallback(url, chunk_steps=4, storage_options=s3)
    quiet_trainer(max_epochs=2, callbacks=[callback]).fit(model, image_loader())
    trace = Trace(url, storage_options=s3)
    assert trace.num_steps == 10
    explainer = Explainer(model.eval(), trace)
    explainer.set_queries([{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(q))} for q in (1, 2)])
    result = explainer.run(num_workers=1)  # a spawned worker reads the chunks with the trace's storage options
    assert explainer.chunk_loader().dataset.trace.storage_options == s3
    for attribution in result.values():
        assert float(attribution.residual.abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="storage_options are for fsspec URLs"):
        Trace("/tmp/a-local-trace", storage_options=s3)
