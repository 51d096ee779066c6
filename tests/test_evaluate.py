"""The quality benchmark: its metrics by hand, label noise, Representer's label targets, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tracetrain.baselines import RepresenterPoints
from lightning_tracetrain.workloads.data import DigitsDataModule
from lightning_tracetrain.workloads.data.base import flip_labels, paint_shortcut
from lightning_tracetrain.workloads.evaluate import EvaluateArguments, evaluate
from lightning_tracetrain.workloads.metrics import detection_rate, identical_class


def test_identical_class_by_hand():
    scores = torch.tensor([[0.1, 0.9, 5.0, 0.3], [2.0, 0.1, 0.0, 0.4], [0.0, 0.0, 0.1, 3.0]])
    labels = torch.tensor([0, 1, -1, 2])  # example 2 was never trained on: ignored despite its top score
    predicted = torch.tensor([1, 1, 2])  # top-1 labels: 1, 0, 2
    assert identical_class(scores, labels, predicted) == pytest.approx(2 / 3)


def test_detection_rate_by_hand():
    influence = torch.tensor([0.5, 9.0, 0.1, 7.0, 0.2, 0.3, 8.0, 0.0, 0.4, 0.6])
    flipped = torch.tensor([1, 2, 3])
    assert detection_rate(influence, flipped, 0.1) == pytest.approx(1 / 3)  # top 1: example 1
    assert detection_rate(influence, flipped, 0.3) == pytest.approx(2 / 3)  # top 3: 1, 6, 3
    assert detection_rate(influence, flipped, 1.0) == 1.0


def test_flip_labels_flips_exactly_the_share_to_other_classes():
    labels = torch.arange(200) % 10
    noisy, flipped = flip_labels(labels, 0.1, 10, seed=3)
    assert len(flipped) == 20 and len(torch.unique(flipped)) == 20
    assert bool((noisy[flipped] != labels[flipped]).all())
    kept = torch.ones(200, dtype=torch.bool)
    kept[flipped] = False
    assert torch.equal(noisy[kept], labels[kept])
    again, flipped_again = flip_labels(labels, 0.1, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(flipped, flipped_again)
    with pytest.raises(ValueError, match="label_noise"):
        flip_labels(labels, 1.5, 10)


def test_digits_label_noise_records_the_flipped_ids():
    clean, noisy = DigitsDataModule(), DigitsDataModule(label_noise=0.1)
    clean.setup("fit"), noisy.setup("fit")
    y_clean = torch.stack([clean.train_dataset[i]["y"] for i in range(len(clean.train_dataset))])
    y_noisy = torch.stack([noisy.train_dataset[i]["y"] for i in range(len(noisy.train_dataset))])
    assert torch.equal(torch.nonzero(y_clean != y_noisy).flatten(), noisy.flipped)
    assert len(noisy.flipped) == round(0.1 * len(y_clean))


def test_digits_shortcut_paints_the_patch_on_the_share_of_one_class_only():
    clean, painted = DigitsDataModule(), DigitsDataModule(shortcut=0.5, shortcut_class=6)
    clean.setup("fit"), painted.setup("fit")
    x_clean, y = clean.train_dataset.dataset.tensors
    x_painted, y_painted = painted.train_dataset.dataset.tensors
    assert torch.equal(y, y_painted)
    changed = torch.nonzero((x_clean != x_painted).flatten(1).any(1)).flatten()
    assert torch.equal(changed, painted.shortcut_ids)
    assert len(changed) == round(0.5 * int((y == 6).sum())) and bool((y[changed] == 6).all())
    assert bool((x_painted[changed, 0, 6:, :2] == 2.0).all())  # the 2x2 bottom-left square, brighter than any ink
    assert torch.equal(x_painted[changed, 0, :6], x_clean[changed, 0, :6])  # nothing else touched
    assert torch.equal(x_painted[changed, 0, 6:, 2:], x_clean[changed, 0, 6:, 2:])
    assert len(clean.shortcut_ids) == 0
    with pytest.raises(ValueError, match="shortcut"):
        paint_shortcut(x_clean, y, 6, 1.5)
    with pytest.raises(ValueError, match="shortcut_class 11"):
        paint_shortcut(x_clean, y, 11, 0.5)


def test_representer_with_label_targets_scores_self_influence_from_alpha():
    from conftest import TinyCNN, image_loader

    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = image_loader(n=30).dataset
    rp = RepresenterPoints(model, targets="labels").fit(DataLoader(data, batch_size=8))
    y = torch.stack([data[i]["y"] for i in range(30)])
    torch.testing.assert_close(rp.self_influence(), rp.alpha[torch.arange(30), y].abs())
    torch.testing.assert_close(rp.weight, rp.alpha.T @ rp.features, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        RepresenterPoints(model, targets="noise").fit(DataLoader(data, batch_size=8))


def test_evaluate_end_to_end_on_a_short_run(tmp_path):
    result = evaluate(
        EvaluateArguments(str(tmp_path), epochs=1, queries=12, cladec_epochs=1, classifier_epochs=1), log=lambda s: None
    )
    layers = ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
    expected = {f"ours {lay} ({s})" for lay in layers for s in ("gamma", "cosine")}
    expected |= {f"TracIn {lay} ({s})" for lay in layers for s in ("dot", "cosine")}
    expected |= {"Representer Points", "Representer Points (authors' kernel)"}
    assert set(result["identical_class"]) == expected
    lowest = {f"ours {lay} ({s}, lowest first)" for lay in layers for s in ("gamma", "cosine")}
    no_self_influence = {f"TracIn {lay} (cosine)" for lay in layers} | {"Representer Points (authors' kernel)"}
    assert set(result["mislabel_detection"]) == (expected | lowest) - no_self_influence
    assert all(0.0 <= v <= 1.0 for v in result["identical_class"].values())
    # 12 queries: every share is a multiple of 1/12
    assert all(abs(v * 12 - round(v * 12)) < 1e-9 for v in result["identical_class"].values())
    noisy = DigitsDataModule(label_noise=0.1)
    noisy.setup("fit")
    assert result["flipped"] == round(0.1 * len(noisy.train_dataset)) == len(noisy.flipped)
    rates = result["mislabel_detection"]
    assert all(r["top 10%"] <= r["top 20%"] <= 1.0 for r in rates.values())
    assert set(result["cladec"]) == {"ClaDec alpha=0", "ClaDec alpha=0.1", "reference autoencoder"}
    assert json.loads((tmp_path / "evaluation.json").read_text()) == result
    table = (tmp_path / "evaluation.md").read_text()
    assert "| Representer Points |" in table and "| reference autoencoder |" in table
