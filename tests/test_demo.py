"""`make demo`'s job, shortened to one epoch."""

from __future__ import annotations

from lightning_tracetrain import demo


def test_demo_trains_traces_and_summarizes(tmp_path, capsys):
    trace = demo.main(["--out", str(tmp_path), "--epochs", "1"])
    out = capsys.readouterr().out
    assert trace.num_steps == 40  # ceil(1257 training digits / 32)
    assert "net.8" in out and "compression" in out and "test accuracy" in out
    assert (tmp_path / "model.ckpt").exists()
