"""One writer per trace (a lease), one atomic commit, validated counters, creation that leaves nothing behind."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import TinyCNN, committed, finish, image_loader, quiet_trainer, start_run

from lightning_tracetrain import Trace, TraceCallback, TraceCorruptError, TraceWriteError
from lightning_tracetrain.trace.lease import lease_path


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_finishes_intact(tmp_path):
    trace, go = tmp_path / "first" / "trace", tmp_path / "go"
    first = start_run(tmp_path / "first", "--max-steps", "40", "--hold", str(go))  # waits at step 10 for `go`
    deadline = time.monotonic() + 120
    while committed(trace) < 9:
        assert first.poll() is None, finish(first)[1]
        assert time.monotonic() < deadline, "the first run did not commit in time"
        time.sleep(0.05)
    holder = json.loads(Path(lease_path(str(trace))).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and holder["run_id"]

    second = start_run(tmp_path / "second", "--trace", str(trace), "--overwrite", "--max-steps", "5")
    code, error = finish(second)
    assert code != 0
    assert "TraceBusyError: Another run is writing the trace" in error and f"pid {first.pid} on host" in error
    assert first.poll() is None  # still holding: the refusal happened while it was writing
    go.touch()

    code, error = finish(first)
    assert code == 0, error
    result = Trace(trace)  # the first run's trace, whole: every step, the final weights
    assert result.num_steps == 40 and result.run_id == holder["run_id"]
    np.testing.assert_array_equal(result.steps.global_step, np.arange(40))
    final = torch.load(tmp_path / "first" / "final.pt")
    for layer in result.layers:
        for param, value in result.final(layer).items():
            torch.testing.assert_close(value, final[f"{layer}.{param}"], atol=1e-6, rtol=1e-5)
    assert not Path(lease_path(str(trace))).exists()  # released at the end


@pytest.mark.parametrize(
    "holder",
    [
        {"host": "another-host", "pid": 1, "heartbeat": time.time() - 3600},  # no heartbeat for an hour
        {"host": socket.gethostname(), "pid": 2**22 + 1, "heartbeat": time.time()},  # this host, the process is gone
    ],
    ids=["old-heartbeat", "dead-process"],
)
def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, holder):
    path = tmp_path / "t"
    Path(lease_path(str(path))).write_text(json.dumps({"token": "theirs", "run_id": "abc", **holder}))
    with pytest.warns(UserWarning, match=r"Taking over the lease .*run abc"):
        quiet_trainer(max_steps=3, callbacks=[TraceCallback(path)]).fit(TinyCNN(), image_loader())
    assert Trace(path).num_steps == 3 and not Path(lease_path(str(path))).exists()


def test_a_live_lease_refuses_overwrite_too(tmp_path):
    path = tmp_path / "t"
    live = {"token": "theirs", "run_id": "abc", "host": "another-host", "pid": 1, "heartbeat": time.time()}
    Path(lease_path(str(path))).write_text(json.dumps(live))
    trainer = quiet_trainer(max_steps=3, callbacks=[TraceCallback(path, overwrite=True)])
    with pytest.raises(Exception, match=r"Another run is writing the trace .*run abc, pid 1 on host another-host"):
        trainer.fit(TinyCNN(), image_loader())
    assert not path.exists() and json.loads(Path(lease_path(str(path))).read_text())["token"] == "theirs"


def test_a_reader_polling_during_training_never_sees_counters_from_two_commits(tmp_path):
    """Every commit writes both counters in one store write: 8 example rows per step, always."""
    path, seen, stop = tmp_path / "t", [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
            except (FileNotFoundError, ValueError):
                continue
            seen.append((attrs["steps_committed"], attrs["examples_committed"]))

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        trainer = quiet_trainer(max_epochs=8, callbacks=[TraceCallback(path, chunk_steps=1)])
        trainer.fit(TinyCNN(), image_loader(n=48, batch_size=8))
    finally:
        stop.set()
        reader.join()
    commits = {steps for steps, _ in seen}
    assert len(commits) > 10  # the reader saw many commits
    assert all(examples == 8 * steps for steps, examples in seen), [p for p in seen if p[1] != 8 * p[0]][:5]


@pytest.fixture(scope="module")
def good(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("counters") / "t"
    quiet_trainer(max_steps=10, callbacks=[TraceCallback(path, chunk_steps=4)]).fit(TinyCNN(), image_loader(n=48))
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"steps_committed": 1000}, r"holds 10 rows, fewer than the 1000 committed steps"),
        ({"steps_committed": -1}, r"steps_committed is -1, not a non-negative integer"),
        ({"steps_committed": 2.5}, r"steps_committed is 2.5, not a non-negative integer"),
        ({"steps_committed": "7"}, r"steps_committed is '7', not a non-negative integer"),
        ({"examples_committed": 56}, r"example_stop ends at row 80, but examples_committed is 56"),
        ("example_stop", r"steps/example_stop decreases"),
        ("global_step", r"steps/global_step jumps from 3 to 7 after committed step 3"),
        ("shorter array", r"layers/fc/delta/weight holds 6 rows, fewer than the 10 committed steps"),
    ],
    ids=["beyond", "negative", "float", "string", "examples", "example_stop", "global_step", "shape"],
)
def test_impossible_counters_are_a_trace_corrupt_error_naming_the_field(good, tmp_path, damage, message):
    path = tmp_path / "damaged"
    shutil.copytree(good, path)
    group = zarr.open_group(str(path), mode="r+")
    if isinstance(damage, dict):
        group.update_attributes(damage)
    elif damage == "example_stop":
        stops = group["steps/example_stop"]
        stops[4] = 8
    elif damage == "global_step":
        steps = group["steps/global_step"]
        steps[4:] = steps[4:] + 3
    else:
        group["layers/fc/delta/weight"].resize((6, 8, 36))
    with pytest.raises(TraceCorruptError, match=message):
        Trace(path)


def test_creation_on_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    original = Path.write_bytes

    def full(self: Path, data: Any) -> int:  # a new trace's files are written in one pass (trace.store.prepare)
        if "initial" in self.parts and self.name != "zarr.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    trainer = quiet_trainer(max_steps=3, callbacks=[TraceCallback(tmp_path / "t")])
    with pytest.raises(TraceWriteError, match=r"Creating the trace at .* failed .*No space left.*nothing was left"):
        trainer.fit(TinyCNN(), image_loader())
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no trace, no .t.creating-*, no lease


def test_the_folder_of_a_killed_creation_is_removed_by_the_next_run(tmp_path):
    debris = tmp_path / ".t.creating-deadbeef"
    (debris / "layers").mkdir(parents=True)
    quiet_trainer(max_steps=2, callbacks=[TraceCallback(tmp_path / "t")]).fit(TinyCNN(), image_loader())
    assert not debris.exists() and Trace(tmp_path / "t").num_steps == 2
