"""The trace contract: every storage mode on every store keeps the same promises.

For each storage mode (lossless, compact, factored, lowrank) and store (a local folder,
fsspec's in-memory filesystem, S3 on loopback):

- a run that crashes and is resumed from an older checkpoint continues the trace
  without gap or duplicate;
- the initial weights plus the stored steps rebuild the weights after every step,
  across the resume (exactly; compact within one step's rounding, and bit for bit
  the error-feedback replay of the exact deltas, so its carry survived the resume; lowrank
  bit for bit the power iterations over the exact deltas, its residual rebuilding the
  weights at the checkpoint and at the end);
- completeness: ``gamma_0 + sum_t gamma_t (+ unattributed) = <Z, Z_traced>`` where ``Z_traced``
  is the pre-activation with the trace's final weights (``= ||Z||^2`` except for compact).

A crash here is an exception in the training loop; killing the process with
SIGKILL is tested with real processes in test_crash.py (local) and
test_object_storage.py (S3): a memory store ends with its process.
"""

from __future__ import annotations

import uuid
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import (
    PlainNet,
    Snapshots,
    assert_matches_snapshots,
    image_loader,
    quiet_trainer,
    replay_error_feedback,
    replay_power_steps,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tracetrain import StorageMode, Trace, TraceCallback
from lightning_tracetrain import functional as Fx
from lightning_tracetrain.explain import Explainer

KEEPBITS = 4
RANK = 2


def assert_lowrank_replays(trace: Trace, exact: Trace, final: dict[str, torch.Tensor]) -> None:
    """Each stored product is bit for bit one warm-started power iteration over the exact delta (the warm start
    and the residual survived the resume), and initial + products + stored residual are the final weights."""
    steps, _ = trace.residual("conv")
    assert steps == trace.num_steps
    for layer in trace.spec.lowrank:
        stored = trace.read_chunk(layer)[1]
        p, q = replay_power_steps(exact.deltas(layer)["weight"], RANK)
        assert torch.equal(stored.p, p) and torch.equal(stored.q, q), layer
        torch.testing.assert_close(trace.final(layer)["weight"], final[f"{layer}.weight"], atol=1e-6, rtol=1e-6)


@pytest.fixture(params=["local", "memory", "s3"])
def location(request: Any, tmp_path: Any) -> Any:
    """A function giving a fresh trace location of the store under test for a name."""
    run = uuid.uuid4().hex[:8]
    if request.param == "s3":
        request.getfixturevalue("s3")
        return lambda name: f"s3://traces/contract/{run}/{name}"
    if request.param == "memory":
        return lambda name: f"memory://contract/{run}/{name}"
    return lambda name: str(tmp_path / name)


class _Crash(pl.Callback):
    """Fails the run after the optimizer step that makes ``global_step`` reach ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("crash for the test")


@pytest.mark.parametrize("mode", list(StorageMode))
def test_trace_contract(location, mode, tmp_path):
    """Crash at step 13, resume from the checkpoint of step 5, train to 20; then check the whole contract."""
    reference = tmp_path / "reference"  # compact, lowrank: a lossless trace of the same steps, to compare with
    lossy = mode in (StorageMode.compact, StorageMode.lowrank)

    def callbacks() -> list[pl.Callback]:
        traced = [TraceCallback(location(mode), storage=mode, keepbits=KEEPBITS, rank=RANK, chunk_steps=4)]
        return traced + ([TraceCallback(reference, chunk_steps=4)] if lossy else [])

    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=5, save_top_k=-1)
    first = Snapshots()
    trainer = quiet_trainer(
        max_steps=40, enable_checkpointing=True, callbacks=[*callbacks(), checkpoints, first, _Crash(13)]
    )
    with pytest.raises(RuntimeError, match="crash for the test"):
        trainer.fit(PlainNet(), image_loader(n=44))  # 44 examples in batches of 8: 6 steps per epoch
    assert Trace(location(mode)).num_steps >= 13  # what was buffered at the crash is committed

    model, second = PlainNet(), Snapshots()
    trainer = quiet_trainer(max_steps=20, callbacks=[*callbacks(), second])
    trainer.fit(model, image_loader(n=44), ckpt_path=tmp_path / "ckpt" / "step=5.ckpt")
    trace = Trace(location(mode))
    assert trace.storage == mode and trace.spec.factored == (("fc",) if mode == StorageMode.factored else ())

    # no gap, no duplicate: steps 5..12 of the first run are gone, 5..19 of the resumed one follow step 4
    assert trace.num_steps == 20
    np.testing.assert_array_equal(trace.steps.global_step, np.arange(20))
    assert trace.steps.example_stop[-1] == len(trace.examples.index) == trace.steps.rows.sum() == 20 * 8 - 2 * 4

    # the initial weights plus the stored steps rebuild the weights after every step, across the resume
    snapshots = {k: first.states[k] for k in range(6)} | {k: second.states[k] for k in range(5, 21)}
    if not lossy:
        assert_matches_snapshots(trace, snapshots)
    elif mode == StorageMode.lowrank:
        assert trace.spec.lowrank == ("conv", "fc", "head")  # rank 2: fewer values than each weight
        assert_lowrank_replays(trace, Trace(reference), snapshots[20])
    else:
        exact, bound = Trace(reference), {}
        for layer in trace.layers:
            for param, deltas in exact.deltas(layer).items():
                # bit for bit the error feedback of the exact deltas: the carry survived the resume
                assert torch.equal(trace.deltas(layer)[param], replay_error_feedback(deltas, KEEPBITS)), (layer, param)
                bound[f"{layer}.{param}"] = 2.0**-KEEPBITS * deltas.abs().max(0).values  # one step's rounding
        assert_matches_snapshots(trace, snapshots, bound=bound)

    # completeness: gamma_0 + sum_t gamma_t = <Z, Z_traced>, Z_traced with the weights the trace adds up to
    queries = [{"x": torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(q))} for q in range(3)]
    results = Explainer(model.eval(), trace).explain(queries)
    modules = dict(model.named_modules())
    for name, a in results.items():
        assert (a.rows is not None) == trace.spec.is_factored(name)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = modules[name].register_forward_hook(lambda m, args, out, seen=seen: seen.append((args[0], out)))
        with torch.no_grad():
            for q in queries:
                model(q["x"])
        hook.remove()
        final = trace.final(name)
        expected = torch.stack([(z * Fx.layer_output(modules[name], x, final)).sum() for x, z in seen]).double()
        total = a.init.double() + a.gamma.double().sum(1)
        if a.unattributed is not None:  # lowrank: the residual's share
            total = total + a.unattributed.double()
        assert (a.unattributed is not None) == trace.spec.is_lowrank(name)
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5 * float(a.z_sq.max()))
        if mode != StorageMode.compact:
            assert float(a.residual.abs().max()) <= 1e-5, name  # Z_traced is Z: the shares add up to ||Z||^2
