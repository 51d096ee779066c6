"""`make demo`'s job, shortened to one epoch."""

from __future__ import annotations

from lightning_tracetrain import demo


def test_demo_trains_traces_and_summarizes(tmp_path, capsys):
    trace = demo.main(["--out", str(tmp_path), "--epochs", "1"])
    out = capsys.readouterr().out
    assert trace.num_steps == 40  # 1257 training digits, 10 classes of 124-127: 4 single-class batches each
    assert (trace.steps.label >= 0).all() and len(trace.ghost_examples(0)) == 10
    assert "40 of 40 steps single-class over 10 classes" in out
    assert "net.fc2" in out and "compression" in out and "test accuracy" in out
    assert (tmp_path / "model.ckpt").exists()
