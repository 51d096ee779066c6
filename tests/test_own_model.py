"""Your own model, unchanged: an ordinary ``x, y = batch`` LightningModule, traced and explained after one line.

The models and data below are what a new user brings: plain ``(x, y)`` TensorDatasets,
shuffled DataLoaders, BatchNorm, no LightningDataModule. The one change is wrapping the
training set in ``IndexedDataset``; explaining from the CLI names the test set with
``--test-data``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import IndexedDataset, Trace, TraceCallback
from lightning_tracetrain.explain import Explainer
from lightning_tracetrain.explain.cli import main as explain_main

pytestmark = pytest.mark.slow


class _Tutorial(pl.LightningModule):
    """How a tutorial trains: ``x, y = batch``, cross-entropy, SGD."""

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class PlainMLP(_Tutorial):
    def __init__(self, hidden: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class PlainCNN(_Tutorial):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
        )


def _digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    return TensorDataset(x[:600], y[:600]), TensorDataset(x[1500:], y[1500:])


def digits_test_set() -> TensorDataset:
    """What ``--test-data test_own_model:digits_test_set`` calls: the user's own test set, unwrapped."""
    return _digits()[1]


def _fit(model: pl.LightningModule, folder: Path, **trainer_args) -> pl.Trainer:
    train, _ = _digits()
    loader = DataLoader(IndexedDataset(train), batch_size=32, shuffle=True)  # the one changed line
    callbacks = [TraceCallback(folder / "trace", overwrite=True), ModelCheckpoint(folder / "ckpt", save_last=True)]
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        accelerator="cpu", **trainer_args,
    )  # fmt: skip
    trainer.fit(model, loader)
    return trainer


@pytest.mark.parametrize("model_class", [PlainMLP, PlainCNN])
def test_an_unchanged_xy_model_is_traced_and_explained_from_python(tmp_path, model_class, caplog):
    torch.manual_seed(0)
    model = model_class()
    with caplog.at_level(logging.INFO):
        _fit(model, tmp_path)
    assert "has no LightningDataModule" in caplog.text and "--test-data MODULE:FUNCTION" in caplog.text
    trace = Trace(tmp_path / "trace")
    assert trace.num_steps == 2 * 19 and (trace.steps.label == -1).all()  # shuffled batches mix classes
    _, test = _digits()
    queries = [batch for batch, _ in zip(DataLoader(test, batch_size=1), range(3), strict=False)]  # plain (x, y)
    result = Explainer(model.eval(), trace).explain(queries)
    for attribution in result.values():
        assert float(attribution.residual.abs().max()) <= 1e-5  # gamma_0 + sum_t gamma_t == ||Z||^2


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    _fit(PlainCNN(), folder)
    return folder


def test_the_cli_explains_it_with_its_own_test_set_and_draws_every_class(cli_run, tmp_path):
    out = tmp_path / "explanations"
    doc = explain_main(
        ["--ckpt", str(cli_run / "ckpt" / "last.ckpt"), "--trace", str(cli_run / "trace"),
         "--test-data", "test_own_model:digits_test_set", "--queries", "0", "1", "--out", str(out)]
    )  # fmt: skip
    assert doc["mixed_steps"] == 1.0
    labels = digits_test_set().tensors[1]
    assert [q["label"] for q in doc["queries"]] == labels[:2].tolist()
    for query in doc["queries"]:
        for name, layer in query["layers"].items():
            assert abs(layer["completeness_residual"]) <= 1e-5
            drawn = {c: np.asarray(d) for c, d in layer["ridge"]["density"].items()}
            assert len(drawn) == 10, name  # every class has a curve, though no step is single-class
            assert all(d.max() > 0 for d in drawn.values()), name
            assert len(layer["class_scores"]) == 10
    report = (out / "report.html").read_text()
    assert "of the steps mixed several classes" in report and "Which classes built this representation" in report
    assert json.loads((out / "influence.json").read_text())["queries"][0]["query"] == 0


def test_a_checkpoint_of_another_run_names_the_one_that_matches(tmp_path, capsys):
    torch.manual_seed(0)
    _fit(PlainMLP(), tmp_path)
    with pytest.warns(UserWarning, match="exists and is not empty"):
        _fit(PlainMLP(), tmp_path)  # a rerun: ModelCheckpoint keeps last.ckpt and writes last-v1.ckpt
    recorded = Trace(tmp_path / "trace").attrs["checkpoints"]
    assert sorted((Path(c["path"]).name, c["global_step"]) for c in recorded) == [
        ("epoch=1-step=38-v1.ckpt", 38),
        ("last-v1.ckpt", 38),
    ]  # this run's files that still exist
    with pytest.raises(SystemExit) as done:
        explain_main(
            ["--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--trace", str(tmp_path / "trace"),
             "--test-data", "test_own_model:digits_test_set"]
        )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: The checkpoint")
    assert "another run" in err[0] and "last-v1.ckpt (global step 38)" in err[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ckpt", "no/such.ckpt"], "No checkpoint at no/such.ckpt"),
        (["--test-data", "no_such_module:f"], "--test-data no_such_module:f: cannot import f from no_such_module"),
        (["--test-data", "test_own_model:PlainMLP"], "returned a PlainMLP"),
    ],
)
def test_cli_failures_end_in_one_error_line(cli_run, capsys, args, says):
    base = {"--ckpt": str(cli_run / "ckpt" / "last.ckpt"), "--trace": str(cli_run / "trace")}
    base["--trust-module"] = "test_own_model"
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    with pytest.raises(SystemExit) as done:
        explain_main([word for pair in base.items() for word in pair])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(cli_run, capsys, monkeypatch):
    from lightning_tracetrain.explain import cli

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(cli, "load_test_data", broken)
    argv = [
        "--ckpt",
        str(cli_run / "ckpt" / "last.ckpt"),
        "--trace",
        str(cli_run / "trace"),
        "--test-data",
        "test_own_model:x",
    ]
    with pytest.raises(SystemExit):
        explain_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: RuntimeError: something nobody foresaw (unexpected; run again with --debug to see the traceback)"
    ]
    with pytest.raises(RuntimeError, match="something nobody foresaw"):
        explain_main([*argv, "--debug"])
