"""`make demo` and `python -m lightning_tracetrain.explain` end to end on a digits run, report in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import quiet_trainer

from lightning_tracetrain import Trace, demo
from lightning_tracetrain.data import DigitsDataModule
from lightning_tracetrain.explain import main as explain_main
from lightning_tracetrain.models import DigitsCNN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`make demo`'s job (configs/digits.yaml through LightningCLI), one epoch, in a fresh folder."""
    folder = tmp_path_factory.mktemp("digits")
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        demo.main(["--config", str(config), "--epochs", "1", "--queries", "0", "1"])
    finally:
        os.chdir(cwd)
    return folder / "runs" / "digits"


def test_demo_trains_traces_explains_and_reports(run):
    trace = Trace(run / "trace")
    assert trace.num_steps == 40  # 1257 training digits, 10 classes of 124-127: 4 single-class batches each
    assert (trace.steps.label >= 0).all() and len(trace.ghost_examples(0)) == 10
    doc = json.loads((run / "explanations" / "influence.json").read_text())
    assert [q["query"] for q in doc["queries"]] == [0, 1]
    assert (run / "explanations" / "report.html").stat().st_size > 100_000  # plotly is inlined


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
    assert doc["cladec"] == {"layer": "net.fc1", "alpha": 0.0, "epochs": 1}
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


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian package chromium is not installed (.ci/run installs it)"
)
def test_report_loads_in_headless_chromium_without_console_errors(run):
    report = run / "explanations" / "report.html"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=8000",
                "--dump-dom",
                report.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    assert proc.stdout.count('class="plot-container') >= 8  # plotly ran offline and drew the figures


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
    for argv, message in [
        ([*base, "--layers", "net.bn1"], "'net.bn1' was not traced"),
        ([*base, "--queries", "360"], "Query 360 is out of range: the test set of DigitsDataModule has 360 examples"),
        (["--ckpt", str(tmp_path / "other.ckpt"), *base[2:]], "the checkpoint and the trace are from different models"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            explain_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


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
