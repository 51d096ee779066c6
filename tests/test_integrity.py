"""Traces you can trust on disk: damaged chunks and metadata are named, verified, repaired; diverged runs diagnosed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Snapshots, TinyCNN, assert_matches_snapshots, image_loader, quiet_trainer

from lightning_tracetrain import Trace, TraceBusyError, TraceCallback, TraceCorruptError, TraceDivergedError
from lightning_tracetrain.explain import Explainer
from lightning_tracetrain.explain.cli import main as explain_main
from lightning_tracetrain.trace.cli import main as trace_main
from lightning_tracetrain.trace.lease import Lease, lease_path
from lightning_tracetrain.trace.verify import repair, verify
from lightning_tracetrain.workloads.data import DigitsDataModule
from lightning_tracetrain.workloads.models import DigitsCNN

FIXTURE_V1 = Path(__file__).with_name("fixtures") / "trace_v1"


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """A 12-step digits run (chunks of 4 steps) with its checkpoint and the weights after every step."""
    folder = tmp_path_factory.mktemp("integrity")
    torch.manual_seed(0)
    snapshots = Snapshots()
    trainer = quiet_trainer(max_steps=12, callbacks=[TraceCallback(folder / "trace", chunk_steps=4), snapshots])
    trainer.fit(DigitsCNN(channels=4, hidden=8), DigitsDataModule(batch_size=64))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder, snapshots.states


# (what is damaged, the file, what the error must name)
TARGETS = [
    ("deltas", "layers/net.fc1/delta/weight/c/1/0/0", r"chunk 1 of layers/net\.fc1/delta/weight \(steps 4\.\.7\)"),
    ("examples", "examples/index/c/0", r"chunk 0 of examples/index \(example rows 0\.\.767, of steps 0\.\.11\)"),
    ("steps", "steps/label/c/0", r"chunk 0 of steps/label \(steps 0\.\.11\)"),
    ("initial weights", "layers/net.conv1/initial/weight/c/0/0/0/0", r"layers/net\.conv1/initial/weight \(the initial"),
    ("metadata", "zarr.json", r"its metadata document \(zarr\.json\) cannot be read"),
]


def _damage(trace: Path, file: str, how: str) -> None:
    path = trace / file
    data = bytearray(path.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def _read_everything(path: Path) -> None:
    trace = Trace(path)
    trace.examples  # noqa: B018 - reading is the point
    trace.weights_at(trace.num_steps)


@pytest.mark.parametrize("how", ["flipped byte", "truncated"])
@pytest.mark.parametrize(("kind", "file", "named"), TARGETS, ids=[t[0] for t in TARGETS])
def test_damage_is_a_trace_corrupt_error_naming_the_array_and_steps(run, tmp_path, kind, file, named, how, capsys):
    folder, _ = run
    damaged = tmp_path / "trace"
    shutil.copytree(folder / "trace", damaged)
    _damage(damaged, file, how)

    with pytest.raises(TraceCorruptError, match=named):  # from the reader
        _read_everything(damaged)

    with pytest.raises(SystemExit) as done:  # from explain: one error line, no traceback
        explain_main(["--ckpt", str(folder / "last.ckpt"), "--trace", str(damaged), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: The trace at") and "Traceback" not in err
    assert "damaged" in err and (file.split("/c/")[0] if "/c/" in file else file) in err

    with pytest.raises(SystemExit) as done:  # from verify: a report, and exit 1
        trace_main(["verify", str(damaged)])
    out = capsys.readouterr().out
    assert done.value.code == 1 and (file.split("/c/")[0] if "/c/" in file else "zarr.json") in out
    if kind in ("deltas", "steps", "examples"):
        assert "steps" in out


def test_repair_keeps_the_trace_up_to_its_last_intact_step(run, tmp_path, capsys):
    folder, snapshots = run
    damaged = tmp_path / "trace"
    shutil.copytree(folder / "trace", damaged)
    _damage(damaged, "layers/net.fc1/delta/weight/c/1/0/0", "flipped byte")  # steps 4..7
    found = Trace(damaged).verify()  # the trace opens: the damage is inside a chunk
    assert not found.ok and found.intact == 4 and found.steps == 12
    assert [d.array for d in found.damaged] == ["layers/net.fc1/delta/weight"] and found.damaged[0].steps == (4, 8)

    trace_main(["verify", str(damaged), "--repair", "--out", str(tmp_path / "repaired")])
    assert "repaired:" in capsys.readouterr().out
    repaired = Trace(tmp_path / "repaired")
    assert repaired.num_steps == 4 and verify(str(tmp_path / "repaired")).ok
    np.testing.assert_array_equal(repaired.steps.global_step, np.arange(4))
    assert_matches_snapshots(repaired, {k: snapshots[k] for k in range(5)})  # the weights after steps 0..4
    assert not verify(str(damaged)).ok  # the original stays as it was (a copy was repaired)
    assert trace_main(["verify", str(tmp_path / "repaired")]).ok


def test_repair_in_place_never_cuts_a_trace_a_live_run_holds(run, tmp_path):
    folder, snapshots = run
    damaged = tmp_path / "trace"
    shutil.copytree(folder / "trace", damaged)
    _damage(damaged, "layers/net.fc1/delta/weight/c/2/0/0", "truncated")  # steps 8..11
    writer = Lease(str(damaged))
    writer.acquire()  # a live run holds the trace
    try:
        with pytest.raises(TraceBusyError, match="Another run is writing the trace"):
            repair(str(damaged), in_place=True)
        assert Trace(damaged).num_steps == 12  # untouched
    finally:
        writer.release()
    assert repair(str(damaged), in_place=True).ok
    assert Trace(damaged).num_steps == 8 and not Path(lease_path(str(damaged))).exists()
    assert_matches_snapshots(Trace(damaged), {k: snapshots[k] for k in range(9)})


def test_a_version_1_trace_without_checksums_still_reads():
    trace = Trace(FIXTURE_V1 / "trace")
    assert trace.attrs["format_version"] == 1 and trace.num_steps == 5
    assert not trace.steps.nonfinite.any()  # version 1 did not record it
    final = torch.load(FIXTURE_V1 / "final.pt", weights_only=True)
    for layer in trace.layers:
        for param, value in trace.final(layer).items():
            torch.testing.assert_close(value, final[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)
    assert verify(str(FIXTURE_V1 / "trace")).ok
    assert "format  version 1 (no checksums)" in trace.summary()


def test_a_diverged_run_is_diagnosed_at_its_step(tmp_path):
    torch.manual_seed(0)
    model, snapshots = TinyCNN(lr=1e6), Snapshots()  # momentum SGD at lr 1e6: NaN within a few steps
    with pytest.warns(UserWarning, match=r"Global step (\d+) changed the weights by NaN or infinity"):
        quiet_trainer(max_steps=12, callbacks=[TraceCallback(tmp_path / "t"), snapshots]).fit(model, image_loader())
    first_bad = min(k for k, state in snapshots.states.items() if not all(v.isfinite().all() for v in state.values()))
    trace = Trace(tmp_path / "t")
    assert int(np.flatnonzero(trace.steps.nonfinite)[0]) == first_bad - 1  # step k-1 produced the weights after k
    assert f"diverged at global step {first_bad - 1}: it changed the weights by NaN" in trace.summary()
    with pytest.raises(TraceDivergedError, match=rf"training diverged at step {first_bad - 1} \(global step"):
        Explainer(model, trace).explain([{"x": torch.randn(1, 1, 6, 6)}])
