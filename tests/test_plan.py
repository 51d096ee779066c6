"""``python -m lightning_tracetrain plan``: the projection of a run's trace against the trace the run writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.plan import main
from lightning_tracetrain.workloads.runs import trace_modes

MODES = ("lossless", "compact", "lowrank", "factored")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The plan of 2 epochs of configs/digits_factored.yaml (plain SGD: every mode can be measured)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    plan = main(["--config", "digits_factored", "--max-epochs", "2", "--rank", "4", "--out", str(out)])
    return plan, json.loads(out.read_text())


def test_the_projection_is_within_ten_percent_of_the_actual_trace(planned, tmp_path):
    plan, written = planned
    assert plan.steps == 80 and written["steps"] == 80  # 1437 training digits in batches of 32, twice
    pl.seed_everything(0, verbose=False)
    model, datamodule = build("digits_factored")
    traces = trace_modes(model, datamodule, tmp_path, {"lossless": {}, "compact": {}, "lowrank": {"rank": 4},
                                                       "factored": {}}, epochs=2)  # fmt: skip
    for mode in MODES:
        actual = traces[mode].nbytes()["stored"]
        assert traces[mode].num_steps == plan.steps
        assert abs(plan.projected(mode) / actual - 1) <= 0.10, (mode, plan.projected(mode), actual)
        assert written["modes"][mode]["projected"] == pytest.approx(plan.projected(mode))
    assert plan.projected("lowrank") < plan.projected("compact") < plan.projected("lossless")
    assert plan.read_bytes_per_s > 0 and plan.read_seconds("lowrank") < plan.read_seconds("lossless")


def test_a_projection_larger_than_the_free_space_names_what_fits(planned):
    plan, _ = planned
    assert plan.configured == "factored" and plan.warning() is None  # gigabytes free here
    tight = dataclasses.replace(plan, free=int(plan.projected("compact") * 1.01))
    text = tight.warning()
    assert text is not None and "will not fit" in text and "storage='factored'" in text
    assert "storage='compact'" in text and "storage='lowrank'" in text and "storage='lossless'" not in text
    assert "layers=[" in text  # the smallest layers that fit with the configured mode
    assert "| lowrank (rank 4) |" in tight.markdown() and "| NO |" in tight.markdown()


def test_an_optimizer_that_cannot_be_factored_is_said_so(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"  # SGD with momentum
    plan = main(["--config", str(config), "--max-steps", "6", "--measure-steps", "2", "--dirpath", str(tmp_path)])
    assert plan.steps == 6 and plan.dirpath == str(tmp_path)
    assert "needs plain SGD" in plan.modes["factored"].unavailable and "n/a" in plan.markdown()


def test_an_unknown_config_is_one_error_line_listing_the_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "No workload config" in err and "digits_factored" in err
    assert "unexpected" not in err
