"""Each config of configs/ runs for a few steps through LightningCLI, and its checkpoint explains with no flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fake_ogbg_ppa

from lightning_tracetrain import Trace, TraceExistsError
from lightning_tracetrain.explain.cli import main as explain_main
from lightning_tracetrain.lightning_cli import cli_main

CONFIGS = Path(__file__).parents[1] / "configs"
pytestmark = pytest.mark.slow


def _fit_and_explain(name: str, overrides: list[str]) -> tuple[Trace, dict]:
    cli_main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *overrides])
    ckpt = Path("runs", name, "checkpoints", "last.ckpt")
    doc = explain_main(["--ckpt", str(ckpt), "--trace", str(Path("runs", name, "trace"))])
    report = Path("explanations", "report.html").read_text()  # images, graphs or tables: the same page at a glance
    assert "id='contents'" in report and "Which classes built this representation" in report
    assert json.loads(Path("explanations", "influence.json").read_text()) == json.loads(json.dumps(doc))
    return Trace(Path("runs", name, "trace")), doc


def _single_class_steps(trace: Trace, batch_size: int) -> int:
    """Steps of one epoch of single-class batches: every class's examples in ceil(n_c / batch_size) batches."""
    real = ~trace.examples.ghost
    counts = np.bincount(trace.examples.label[real], minlength=1)
    return int(sum(-(-int(n) // batch_size) for n in counts if n))


def _assert_exact(doc: dict) -> None:
    for query in doc["queries"]:
        for layer in query["layers"].values():
            assert abs(layer["completeness_residual"]) <= 1e-5


def test_digits_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trace, doc = _fit_and_explain("digits", ["--trainer.max_epochs", "1"])
    assert trace.num_steps == _single_class_steps(trace, batch_size=32) and (trace.steps.label >= 0).all()
    assert trace.module.class_path == "lightning_tracetrain.workloads.models.cnn.DigitsCNN"
    assert trace.module.init_args["ghost_batch_norm"] is True and "_class_path" not in trace.module.init_args
    _assert_exact(doc)


def test_trace_options_are_overridden_by_name_and_a_rerun_never_replaces_a_trace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "digits.yaml"), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    cli_main(["fit", *args, "--trace.dirpath", "elsewhere/trace", "--trace.storage", "compact"])
    trace = Trace("elsewhere/trace")
    assert trace.num_steps == 2 and trace.storage == "compact" and not Path("runs/digits/trace").exists()
    with pytest.raises(TraceExistsError, match=r"--trace.overwrite true"):
        cli_main(["fit", *args, "--trace.dirpath", "elsewhere/trace"])
    cli_main(["fit", *args, "--trace.dirpath", "elsewhere/trace", "--trace.overwrite", "true"])
    assert Trace("elsewhere/trace").storage == "lossless"


def test_digits_factored_config_attributes_mixed_batches_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trace, doc = _fit_and_explain("digits_factored", ["--trainer.max_epochs", "1"])
    assert trace.storage == "factored" and trace.spec.factored == ("net.fc1",)
    assert not (trace.steps.label >= 0).any()  # ordinary shuffled batches: no step belongs to one class
    shares = {name: layer["example_shares"] for name, layer in doc["queries"][0]["layers"].items()}
    assert shares == {n: "exact" if n == "net.fc1" else "equal split of each step" for n in trace.layers}
    _assert_exact(doc)
    # benchmarks/ build the same workload from the same YAML without LightningCLI
    from lightning_tracetrain.workloads.config import build

    model, datamodule = build("digits_factored")
    assert trace.module.init_args == dict(model.hparams)
    assert trace.datamodule is not None and trace.datamodule.init_args == dict(datamodule.hparams)


def test_cifar10_vgg16_config_on_a_stand_in_of_cifar_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = ["--data.synthetic", "60", "--data.batch_size", "4", "--data.ghost_size", "10", "--data.num_workers", "0"]
    trace, doc = _fit_and_explain(
        "cifar10_vgg16", [*small, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    )
    assert len(trace.layers) == 16  # 13 convolutions + 3 fully connected layers
    assert trace.layer("features.0").params["weight"] == (64, 3, 3, 3)
    assert trace.layer("classifier.6").params["weight"] == (10, 512)
    assert trace.num_steps == 2 and len(trace.ghost_examples(0)) == 10
    _assert_exact(doc)


def test_cifar10_without_its_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 is not at .*cifar-10-batches-py.*--data.root"):
        cli_main(["fit", "--config", str(CONFIGS / "cifar10_vgg16.yaml"), "--trainer.max_steps", "1"])


@pytest.mark.parametrize(("name", "convs"), [("ogbg_ppa_gin", 5), ("ogbg_ppa_shallow", 1)])
def test_ogbg_ppa_configs_on_a_fake_ogb_directory(tmp_path, monkeypatch, name, convs):
    monkeypatch.chdir(tmp_path)
    make_fake_ogbg_ppa(tmp_path / "ogb")
    trace, doc = _fit_and_explain(name, ["--data.root", str(tmp_path / "ogb"), "--trainer.max_epochs", "1"])
    assert trace.layers[-1] == "head" and len(trace.layers) == 3 * convs + 1
    assert trace.layer(f"convs.{convs - 1}.edge_encoder").params["weight"] == (300, 7)
    assert (trace.steps.label >= 0).all()  # single-class batches
    _assert_exact(doc)


def test_ogbg_ppa_without_its_files_says_where_to_put_them(tmp_path):
    from lightning_tracetrain.workloads.data.ogbg_ppa import load_ogbg_ppa

    with pytest.raises(FileNotFoundError, match=r"ogbg-ppa is not at .*ogbg_ppa.*RELEASE_v1.txt.*--data.root"):
        load_ogbg_ppa(tmp_path)
