"""TraceCallback records every optimizer step exactly (in process)."""

from __future__ import annotations

import errno
import re
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import (
    Snapshots,
    TinyCNN,
    TinyGNN,
    assert_matches_snapshots,
    assert_reconstructs,
    image_loader,
    quiet_trainer,
    tiny_graphs,
)
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import (
    IndexedDataset,
    MissingIndexError,
    Trace,
    TraceCallback,
    TraceExistsError,
    TraceMismatchError,
    TraceWriteError,
    UnknownLayerError,
)
from lightning_tracetrain.trace.store import open_group, truncate


class Scheduled(TinyCNN):
    """TinyCNN with a learning rate halved every epoch."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class TwoSteps(TinyCNN):
    """Manual optimization with two optimizer steps per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(batch["x"]), batch["y"]))
            opt.step()


class Overflow(TinyCNN):
    """A loss that overflows at steps 1 and 4, so the AMP scaler skips them."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step in (1, 4) else loss


class TupleCNN(TinyCNN):
    """Trains on plain ``(x, y)`` batches, without example ids."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])


class Other(TinyCNN):
    """A different model class with the same layers as TinyCNN."""


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # momentum and Adam: a delta is still the weights' change
def test_initial_plus_deltas_equals_final_and_snapshots(tmp_path, optimizer):
    torch.manual_seed(0)
    model, snaps = TinyCNN(optimizer=optimizer), Snapshots()
    trainer = quiet_trainer(max_epochs=3, callbacks=[TraceCallback(tmp_path / "t", chunk_steps=4), snaps])
    trainer.fit(model, image_loader(n=42, batch_size=8))  # 6 steps per epoch, chunks of 4: windows cross epochs

    trace = Trace(tmp_path / "t")
    assert trace.layers == ["conv", "fc", "head"]
    assert trace.num_steps == trainer.global_step == 18
    assert "bias" not in trace.initial("head")
    assert_reconstructs(trace, model)
    assert_matches_snapshots(trace, snaps.states)  # after every step
    torch.testing.assert_close(trace.weights_at(11)["fc"]["weight"], snaps.states[11]["fc.weight"])
    # the step deltas are the differences of consecutive snapshots
    d = trace.deltas("conv", 3, 5)["weight"]
    torch.testing.assert_close(d[1], snaps.states[5]["conv.weight"] - snaps.states[4]["conv.weight"])


def test_step_metadata(tmp_path):
    loader = image_loader(n=24, batch_size=8)
    trainer = quiet_trainer(max_epochs=2, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(Scheduled(lr=0.1), loader)
    trace = Trace(tmp_path / "t")
    steps = trace.steps
    np.testing.assert_array_equal(steps.global_step, np.arange(6))
    np.testing.assert_array_equal(steps.epoch, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(steps.batch_idx, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(steps.lr[:, 0], [0.1] * 3 + [0.05] * 3)
    assert trace.lr_columns == ["optimizer0/group0"]
    assert not steps.skipped.any()
    labels = loader.dataset.dataset.tensors[1]
    for t in range(6):  # each epoch sees every example once, with its label
        ex = trace.step_examples(t)
        assert len(ex.index) == 8 and not ex.ghost.any()
        np.testing.assert_array_equal(ex.label, labels[ex.index].numpy())
    for epoch in (0, 1):
        ids = np.concatenate([trace.step_examples(t).index for t in range(3 * epoch, 3 * epoch + 3)])
        assert sorted(ids.tolist()) == list(range(24))
    # what a later tool needs to rebuild the run
    assert trace.module.class_path == "test_callback.Scheduled"
    assert trace.module.init_args == {"optimizer": "sgd", "lr": 0.1}
    assert trace.datamodule is None


def test_datamodule_is_recorded(tmp_path):
    from lightning_tracetrain.workloads.data import DigitsDataModule
    from lightning_tracetrain.workloads.models import DigitsCNN

    dm = DigitsDataModule(batch_size=64, seed=3)
    trainer = quiet_trainer(max_steps=3, callbacks=[TraceCallback(tmp_path / "t", layers="net.fc*")])
    trainer.fit(DigitsCNN(channels=4, hidden=8), dm)
    trace = Trace(tmp_path / "t")
    assert trace.layers == ["net.fc1", "net.fc2"]
    assert trace.datamodule.class_path == "lightning_tracetrain.workloads.data.digits.DigitsDataModule"
    assert trace.datamodule.init_args["seed"] == 3 and trace.datamodule.init_args["batch_size"] == 64
    assert trace.module.init_args["channels"] == 4
    summary = trace.summary()
    assert "steps   3 (epochs 1, skipped 0)" in summary
    assert "net.fc1                  Linear     weight 8x128, bias 8" in summary


def test_gradient_accumulation_records_every_optimizer_step(tmp_path):
    snaps = Snapshots()
    trainer = quiet_trainer(
        max_epochs=2, accumulate_grad_batches=3, callbacks=[TraceCallback(tmp_path / "t", chunk_steps=2), snaps]
    )
    model = TinyCNN()
    trainer.fit(model, image_loader(n=40, batch_size=8))  # 5 batches per epoch: windows of 3 and 2
    trace = Trace(tmp_path / "t")
    assert trace.num_steps == trainer.global_step == 4
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(4))
    # a step's examples are all batches of its window; the last partial window has 2 batches
    sizes = trace.steps.example_stop - trace.steps.example_start
    np.testing.assert_array_equal(sizes, [24, 16, 24, 16])
    np.testing.assert_array_equal(trace.steps.batch_idx, [2, 4, 2, 4])
    assert_reconstructs(trace, model)


def test_manual_optimization_records_every_step(tmp_path):
    model = TwoSteps()
    trainer = quiet_trainer(max_epochs=1, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(model, image_loader(n=24, batch_size=8))
    trace = Trace(tmp_path / "t")
    assert trace.num_steps == trainer.global_step == 6
    np.testing.assert_array_equal(trace.steps.batch_idx, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(trace.step_examples(0).index, trace.step_examples(1).index)
    assert_reconstructs(trace, model)


def test_amp_skipped_steps_are_flagged(tmp_path):
    model = Overflow()
    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = quiet_trainer(max_epochs=1, plugins=[scaler], callbacks=[TraceCallback(tmp_path / "t", chunk_steps=4)])
    trainer.fit(model, image_loader(n=48, batch_size=8))
    trace = Trace(tmp_path / "t")
    assert trace.num_steps == trainer.global_step == 6
    np.testing.assert_array_equal(np.flatnonzero(trace.steps.skipped), [1, 4])
    deltas = trace.deltas("fc")["weight"]
    assert deltas[1].abs().sum() == 0 and deltas[4].abs().sum() == 0 and deltas[0].abs().sum() > 0
    assert len(trace.step_examples(1).index) == 8
    assert_reconstructs(trace, model)


def test_pyg_layers_are_traced(tmp_path):
    from torch_geometric.loader import DataLoader as GraphLoader

    graphs, model = tiny_graphs(), TinyGNN()
    trainer = quiet_trainer(max_epochs=2, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(model, GraphLoader(IndexedDataset(graphs), batch_size=4, shuffle=True))
    trace = Trace(tmp_path / "t")
    assert trace.layers == ["gin.nn.0", "gin.nn.2", "gcn.lin", "out"]
    assert trace.layer("gcn.lin").module_type == "torch_geometric.nn.dense.linear.Linear"
    assert_reconstructs(trace, model)
    ids = np.concatenate([trace.step_examples(t).index for t in range(3)])
    assert sorted(ids.tolist()) == list(range(12))
    for t in range(trace.num_steps):
        ex = trace.step_examples(t)
        np.testing.assert_array_equal(ex.label, ex.index % 2)


def test_unknown_layer_lists_traceable_ones(tmp_path):
    trainer = quiet_trainer(max_steps=1, callbacks=[TraceCallback(tmp_path / "t", layers=["fc", "nope"])])
    with pytest.raises(UnknownLayerError, match=r"'nope'.*Traceable layers: conv, fc, head"):
        trainer.fit(TinyCNN(), image_loader())


def test_batch_without_ids_names_the_wrapper(tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))), batch_size=4)

    trainer = quiet_trainer(max_steps=1, callbacks=[TraceCallback(tmp_path / "t")])
    with pytest.raises(MissingIndexError, match="IndexedDataset"):
        trainer.fit(TupleCNN(), loader)


def test_a_class_defined_inside_a_function_is_warned_about(tmp_path):
    class Local(TinyCNN):
        pass

    with pytest.warns(UserWarning, match=r"<locals>\.Local is defined inside a function.*move it into a module"):
        quiet_trainer(max_steps=1, callbacks=[TraceCallback(tmp_path / "t")]).fit(Local(), image_loader())
    assert Trace(tmp_path / "t").module.class_path.endswith("<locals>.Local")  # recorded all the same


def test_a_class_defined_in_the_script_being_run_is_warned_about(tmp_path):
    script = type("Script", (TinyCNN,), {"__module__": "__main__"})  # as `python train.py` defines it
    with pytest.warns(UserWarning, match=r"__main__\.Script is defined in the script being run.*move it into a module"):
        quiet_trainer(max_steps=1, callbacks=[TraceCallback(tmp_path / "t")]).fit(script(), image_loader())


def test_a_trace_without_a_committed_step_is_replaced_without_asking(tmp_path):
    path = tmp_path / "t"
    quiet_trainer(max_steps=2, callbacks=[TraceCallback(path)]).fit(TinyCNN(), image_loader())
    truncate(open_group(str(path), "r+"), 0)  # what a run killed right after creating its trace leaves
    assert Trace(path).num_steps == 0
    model = TinyCNN()
    quiet_trainer(max_steps=3, callbacks=[TraceCallback(path)]).fit(model, image_loader())  # the fixed rerun
    assert Trace(path).num_steps == 3
    assert_reconstructs(Trace(path), model)


def test_existing_trace_is_protected(tmp_path):
    path = tmp_path / "t"
    quiet_trainer(max_steps=2, callbacks=[TraceCallback(path)]).fit(TinyCNN(), image_loader())

    with pytest.raises(TraceExistsError, match=r"another model \(.*TinyCNN.*overwrite=True"):
        quiet_trainer(max_steps=2, callbacks=[TraceCallback(path)]).fit(Other(), image_loader())
    with pytest.raises(TraceExistsError, match=r"earlier run of this model \(2 steps\).*ckpt_path"):
        quiet_trainer(max_steps=2, callbacks=[TraceCallback(path)]).fit(TinyCNN(), image_loader())
    assert Trace(path).num_steps == 2  # untouched by the refused runs

    model = Other()
    quiet_trainer(max_steps=3, callbacks=[TraceCallback(path, overwrite=True)]).fit(model, image_loader())
    trace = Trace(path)
    assert trace.num_steps == 3 and trace.module.class_path.endswith("Other")
    assert_reconstructs(trace, model)


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    trainer = quiet_trainer(max_steps=1, callbacks=[TraceCallback(tmp_path, overwrite=True)])
    with pytest.raises(TraceExistsError, match="not a trace"):
        trainer.fit(TinyCNN(), image_loader())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_full_disk_gives_clear_error_and_keeps_committed_steps(tmp_path, monkeypatch):
    path = tmp_path / "t"
    model, snaps = TinyCNN(), Snapshots()
    original = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self: Any, key: str, value: Any) -> None:
        # let creation and the first chunks through, then fail like a full disk
        if re.search(r"/delta/\w+/c/2(/|$)", key):  # the third chunk of steps (steps 8..11) of any layer
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    trainer = quiet_trainer(max_epochs=3, callbacks=[TraceCallback(path, chunk_steps=4), snaps])
    with pytest.raises(TraceWriteError, match=r"disk is full.*8 committed steps are intact.*ckpt_path"):
        trainer.fit(model, image_loader(n=96, batch_size=8))
    assert calls["n"] >= 1
    monkeypatch.undo()
    trace = Trace(path)
    assert trace.num_steps == 8
    for layer, params in trace.weights_at(8).items():
        for param, value in params.items():
            torch.testing.assert_close(value, snaps.states[8][f"{layer}.{param}"], atol=1e-6, rtol=1e-5)


def test_commit_on_timer_without_full_chunk(tmp_path):
    """A long chunk is still committed after commit_every_s, so a crash loses little."""
    seen: list[int] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 3:  # training waits here until the timer committed the 3 steps (or 60 s)
                seen.append(_wait_for(lambda: _committed(tmp_path / "t") == 3))

    cb = TraceCallback(tmp_path / "t", chunk_steps=100, commit_every_s=0.05)
    quiet_trainer(max_steps=5, callbacks=[cb, Probe()]).fit(TinyCNN(), image_loader())
    assert seen == [True]  # a chunk of 100 steps was far from full: only the timer commits
    assert Trace(tmp_path / "t").num_steps == 5


def _committed(path: Any) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r").attrs["steps_committed"])
    except FileNotFoundError:
        return -1


def _wait_for(ready: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_resume_refuses_a_trace_that_is_not_the_checkpoints_own(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(max_steps=3, enable_checkpointing=True, callbacks=[TraceCallback(tmp_path / "t"), ckpt])
    trainer.fit(TinyCNN(), image_loader())
    quiet_trainer(max_steps=2, callbacks=[TraceCallback(tmp_path / "t", overwrite=True)]).fit(TinyCNN(), image_loader())
    with pytest.raises(TraceMismatchError, match=r"belongs to trace run \w+, but .* holds run"):
        quiet_trainer(max_steps=5, callbacks=[TraceCallback(tmp_path / "t")]).fit(
            TinyCNN(), image_loader(), ckpt_path=ckpt.last_model_path
        )
    assert Trace(tmp_path / "t").num_steps == 2


def test_tracing_can_start_from_an_untraced_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(TinyCNN(), image_loader())
    model = TinyCNN()
    trainer = quiet_trainer(max_steps=5, callbacks=[TraceCallback(tmp_path / "t")])
    trainer.fit(model, image_loader(), ckpt_path=ckpt.last_model_path)
    trace = Trace(tmp_path / "t")
    np.testing.assert_array_equal(trace.steps.global_step, [3, 4])  # the trace starts at the checkpoint's weights
    assert_reconstructs(trace, model)
