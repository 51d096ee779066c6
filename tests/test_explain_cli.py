"""`make demo` and `python -m lightning_tracetrain.explain` end to end on a digits run, report in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import headless_chromium, needs_chromium, quiet_trainer

from lightning_tracetrain import Trace
from lightning_tracetrain.explain.cli import main as explain_main
from lightning_tracetrain.workloads import demo
from lightning_tracetrain.workloads.data import DigitsDataModule
from lightning_tracetrain.workloads.demo import DemoResult
from lightning_tracetrain.workloads.models import DigitsCNN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, DemoResult]:
    """`make demo`'s job (configs/digits.yaml through LightningCLI), one epoch, in a fresh folder."""
    folder = tmp_path_factory.mktemp("digits")
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = demo.main(["--config", str(config), "--epochs", "1", "--queries", "0", "1"])
    finally:
        os.chdir(cwd)
    return folder / "runs" / "digits", result


@pytest.fixture(scope="module")
def run(demo_run) -> Path:
    return demo_run[0]


def test_demo_trains_traces_explains_and_reports(demo_run):
    run, result = demo_run
    trace = Trace(run / "trace")
    datamodule = DigitsDataModule(**trace.datamodule.init_args)
    datamodule.setup("fit")
    per_class = np.bincount([int(datamodule.train_dataset[i]["y"]) for i in range(len(datamodule.train_dataset))])
    assert trace.num_steps == sum(-(-n // 32) for n in per_class)  # every class in batches of at most 32
    assert (trace.steps.label >= 0).all() and len(trace.ghost_examples(0)) == 10
    doc = json.loads((run / "explanations" / "influence.json").read_text())
    assert doc == json.loads(json.dumps(result.influence))
    assert [q["query"] for q in doc["queries"]] == [0, 1]
    assert (run / "explanations" / "report.html").stat().st_size > 100_000  # plotly is inlined
    # class specificity over the whole test set: a share per layer, the logit layer the most class-specific
    spec = result.specificity
    assert spec is not None and spec["queries"] == len(datamodule.test_dataset)
    shares = {name: s["mean"] for name, s in spec["layers"].items()}
    assert list(shares) == trace.layers and all(0.0 <= v <= 1.0 for v in shares.values())
    assert shares["net.fc2"] == max(shares.values()) > spec["share_of_steps_of_the_predicted_class"]


def test_cli_writes_the_documented_influence_json(run, tmp_path):
    out = tmp_path / "out"
    doc = explain_main(
        [
            "--ckpt",
            str(run / "checkpoints" / "last.ckpt"),
            "--trace",
            str(run / "trace"),
            "--queries",
            "0",
            "7",
            "--top-k",
            "3",
            "--out",
            str(out),
            "--cladec",
            "net.fc1",
            "--cladec-epochs",
            "1",
        ]
    )
    assert json.loads((out / "influence.json").read_text()) == json.loads(json.dumps(doc))
    cladec = doc["cladec"]
    settings = {k: v for k, v in cladec.items() if k != "reconstructions"}
    assert settings == {"layer": "net.fc1", "alpha": 0.0, "epochs": 1}
    assert set(cladec["reconstructions"]) == {"0", "7"}
    for pictures in cladec["reconstructions"].values():  # 8x8 images from both decoders
        assert set(pictures) == {"ClaDec alpha=0", "reference autoencoder"}
        assert all(np.asarray(p).shape == (8, 8) for p in pictures.values())
    report = (out / "report.html").read_text()
    assert report.count("ClaDec alpha=0\\u003cbr\\u003efrom net.fc1") == 2  # one per query, beside it
    assert report.count("reference autoencoder\\u003cbr\\u003efrom net.fc1") == 2
    test_set = DigitsDataModule(**Trace(run / "trace").datamodule.init_args)  # the split the trace recorded
    test_set.setup("test")
    for q in doc["queries"]:
        assert q["label"] == int(test_set.test_dataset[q["query"]]["y"])
        assert 0 <= q["predicted"] < 10 and len(q["probabilities"]) == 10
        assert list(q["layers"]) == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
        for layer in q["layers"].values():
            assert abs(layer["completeness_residual"]) <= 1e-5
            scores = [e["score"] for e in layer["top_examples"]]
            assert len(scores) == 3 and scores == sorted(scores, reverse=True)
            assert all(e["score"] < 0 for e in layer["opponents"])
            assert list(layer["class_scores"].values()) == sorted(layer["class_scores"].values(), reverse=True)
            assert sum(layer["class_scores"].values()) + layer["init_score"] == pytest.approx(
                layer["norm_sq"], rel=1e-4
            )


def test_cosine_ranking_and_privacy_mode_through_python_m(run, tmp_path):
    out = tmp_path / "private"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_tracetrain.explain",
            "--ckpt",
            str(run / "checkpoints" / "last.ckpt"),
            "--trace",
            str(run / "trace"),
            "--queries",
            "3",
            "--score",
            "cosine",
            "--privacy",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.html" in proc.stdout
    text = (out / "influence.json").read_text()
    doc = json.loads(text)
    assert doc["privacy"] is True and doc["score"] == "cosine"
    assert '"example"' not in text and "top_examples" not in text  # class-level aggregates only
    assert set(doc["queries"][0]["layers"]["net.fc2"]) >= {"class_scores", "init_score", "completeness_residual"}


@needs_chromium
def test_report_loads_in_headless_chromium_without_console_errors(run):
    console, dom = headless_chromium(run / "explanations" / "report.html")
    assert not console, console
    assert dom.count('class="plot-container') >= 8  # plotly ran offline and drew the figures
    assert 'id="contents"' in dom and dom.count('href="#q') >= 2 + 2 * 4  # queries and their layers
    drawn_titles = re.findall(r'class="gtitle"[^>]*>Which classes built this representation', dom)
    assert len(drawn_titles) == 2  # the summary heatmap of each query, drawn
    assert "How to read this" in dom


def test_thumbnails_have_one_size_however_many_there_are():
    from lightning_tracetrain.explain.report import THUMBNAIL, images_figure

    for n in (1, 3, 5):
        fig = images_figure([np.zeros((8, 8))] * n, [str(i) for i in range(n)], "title")
        assert fig.layout.width - 40 == THUMBNAIL * n


def test_cli_names_bad_input(run, tmp_path, capsys):
    base = [
        "--ckpt",
        str(run / "checkpoints" / "last.ckpt"),
        "--trace",
        str(run / "trace"),
        "--out",
        str(tmp_path / "x"),
    ]
    other = DigitsCNN(channels=4)  # a checkpoint of another model of the same class
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(other, DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    twin = DigitsCNN(**Trace(run / "trace").module.init_args)  # the same architecture, another run's weights
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(twin, DigitsDataModule(single_class=True, ghost_size=10))
    trainer.save_checkpoint(tmp_path / "twin.ckpt")
    for argv, message in [
        ([*base, "--layers", "net.bn1"], "'net.bn1' was not traced"),
        ([*base, "--queries", "360"], "Query 360 is out of range: the test set of DigitsDataModule has 360 examples"),
        (["--ckpt", str(tmp_path / "other.ckpt"), *base[2:]], "the checkpoint and the trace are of different models"),
        (["--ckpt", str(tmp_path / "twin.ckpt"), *base[2:]], "the checkpoint and the trace are from different models"),
        (["--ckpt", str(tmp_path / "missing.ckpt"), *base[2:]], "No checkpoint at"),
        ([*base, "--top-k", "-1"], "--top-k must be 0 or more, got -1"),
        ([*base, "--bandwidth", "0"], "--bandwidth must be positive, got 0.0"),
        ([*base, "--devices", "two"], "--devices must be a number of devices or 'auto'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            explain_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_query_batches_give_the_same_document_and_the_report_draws_the_first_ones(run, tmp_path):
    args = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--trace", str(run / "trace"), "--queries", "5", "3", "9"]
    whole = explain_main([*args, "--out", str(tmp_path / "whole")])
    batched = explain_main([*args, "--out", str(tmp_path / "batched"), "--query-batch", "2", "--report-queries", "1"])
    assert [q["query"] for q in batched["queries"]] == [5, 3, 9]
    for a, b in zip(whole["queries"], batched["queries"], strict=True):
        for name, layer in a["layers"].items():
            other = b["layers"][name]
            _assert_same(
                {k: v for k, v in layer.items() if k != "ridge"}, {k: v for k, v in other.items() if k != "ridge"}
            )
            assert ("ridge" in other) == (a is whole["queries"][0])  # figures for the first query only
    assert set(batched["images"]["test"]) == {"5"}
    report = (tmp_path / "batched" / "report.html").read_text()
    assert report.count("<h2 id='q") == 1 and "Figures for the first 1 of 3 queries" in report
    assert all(f"<tr><td>{q}</td>" in report for q in (5, 3, 9))  # every query in the summary table


def _assert_same(a, b, path=""):
    """Equal documents, floats to tolerance (paths of the inputs may differ)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def test_two_processes_give_the_same_influence_json_as_one(run, tmp_path):
    args = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--trace", str(run / "trace"), "--queries", "0", "4"]
    one = explain_main([*args, "--out", str(tmp_path / "one")])
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_tracetrain.explain", *args, "--out", str(tmp_path / "two"), "--devices", "2",
         "--accelerator", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout  # really two processes (DDP, gloo)
    assert proc.stdout.count("wrote") == 1  # rank 0 alone writes
    two = json.loads((tmp_path / "two" / "influence.json").read_text())
    _assert_same(one, two)


PAYLOAD = """
from pathlib import Path

Path(__file__).with_name("imported.txt").write_text("the trace ran my code")

from lightning_tracetrain.workloads.models import DigitsCNN


class Model(DigitsCNN):
    pass
"""


class _Payload:
    """An object whose unpickling would write a file (what a malicious checkpoint holds)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "the checkpoint ran my code"))


def test_untrusted_traces_and_checkpoints_run_no_code(run, tmp_path, capsys, monkeypatch):
    """A trace naming a module outside the package is refused before anything is imported, and a checkpoint
    holding more than tensors and plain data is refused before anything is unpickled."""
    import torch
    import zarr

    code = tmp_path / "code"
    code.mkdir()
    (code / "evil_payload.py").write_text(PAYLOAD)
    monkeypatch.syspath_prepend(str(code))  # importable: only the trust check stands in the way
    trace = tmp_path / "trace"
    shutil.copytree(run / "trace", trace)
    group = zarr.open_group(str(trace), mode="r+")
    group.attrs.update({"module": {**group.attrs["module"], "class_path": "evil_payload.Model"}})
    argv = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--trace", str(trace), "--out", str(tmp_path / "out")]

    with pytest.raises(SystemExit) as exit_info:
        explain_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "evil_payload.Model" in err and "--trust-module evil_payload" in err and "--trust-trace" in err
    assert not (code / "imported.txt").exists() and "evil_payload" not in sys.modules

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["note"] = _Payload(str(tmp_path / "unpickled.txt"))
    torch.save(checkpoint, tmp_path / "payload.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        explain_main(["--ckpt", str(tmp_path / "payload.ckpt"), *argv[2:], "--trust-module", "evil_payload"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "holds objects other than tensors and plain data" in err
        and "--trust-trace" in err
    )
    assert not (tmp_path / "unpickled.txt").exists()
    assert not (code / "imported.txt").exists()  # the model class is imported only after the checkpoint passed

    doc = explain_main([*argv, "--trust-module", "evil_payload", "--queries", "0"])  # the user's explicit trust
    assert (code / "imported.txt").exists() and doc["model"] == "evil_payload.Model"
