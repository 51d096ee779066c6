"""``python -m lightning_tracetrain.evaluate``: our attribution beside Representer Points, TracIn and ClaDec on digits.

Trains the digits workload of ``configs/digits.yaml`` (single-class batches with
ghosts, ghost batch norm, cosine decay) twice with tracing, once on clean
labels and once with ``--label-noise`` of the training labels flipped, then:

- identical-class test (clean model): share of test inputs whose top-1
  training example has the class the model predicts; ours per layer with
  ``score=gamma`` (Algorithm 1) and ``score=cosine``, Representer Points, and
  TracIn per layer (gradient dot product and cosine);
- mislabel detection (noisy model): training examples ranked by self-influence,
  share of the flipped labels found in the top 10% and 20% (chance: 10%, 20%).
  Self-influence of example ``i`` for our method is its Algorithm-1 score for
  its own input as the query: the sum over the steps that trained on ``i`` of
  the step's contribution to ``i``'s pre-activation (gamma split over the
  step's real examples; with ``cosine`` the summed cosine). TracIn: the summed
  ``eta_k ||grad l(z_i; w_k)||^2``. Representer Points: ``|alpha_i,y_i|``
  after fine-tuning towards the (noisy) training labels;
- ClaDec (clean model, one layer): accuracy of a fresh classifier trained on
  reconstructions of the training set and tested on reconstructions of the
  test set, for ClaDec (alpha 0 and ``--cladec-alpha``) and the reference autoencoder.

Writes ``OUT/evaluation.json`` and ``OUT/evaluation.md`` (the table in the README).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain import IndexedDataset, Trace, TraceCallback
from lightning_tracetrain.baselines.cladec import fit_decoders, reconstruct_all
from lightning_tracetrain.baselines.representer import RepresenterPoints
from lightning_tracetrain.baselines.tracin import TracIn
from lightning_tracetrain.data.digits import DigitsDataModule
from lightning_tracetrain.explainer import Explainer, example_attribution
from lightning_tracetrain.models.cnn import DigitsCNN

Log = Callable[[str], None]


# ---------------------------------------------------------------------- metrics (plain functions)


def identical_class(scores: Tensor, train_labels: Tensor, predicted: Tensor, k: int = 1) -> float:
    """Share of the ``k`` highest-scoring training examples that have the query's predicted class (mean over queries).

    ``scores`` is ``(Q, n)``; examples with label -1 (never trained on) are ignored.
    """
    scores = scores.double().masked_fill(train_labels[None, :] < 0, -torch.inf)
    top = scores.topk(k, dim=1).indices
    return float((train_labels[top] == predicted[:, None]).double().mean())


def detection_rate(self_influence: Tensor, flipped: Tensor, fraction: float) -> float:
    """Share of the flipped examples among the ``fraction`` of examples with the highest self-influence."""
    k = round(fraction * len(self_influence))
    top = torch.argsort(self_influence.double(), descending=True, stable=True)[:k]
    return float(torch.isin(top, flipped).sum() / max(len(flipped), 1))


# ---------------------------------------------------------------------- workload


def digits_workload(seed: int = 0, label_noise: float = 0.0) -> tuple[DigitsCNN, DigitsDataModule]:
    """The model and datamodule of configs/digits.yaml (single-class batches with ghosts, ghost batch norm)."""
    datamodule = DigitsDataModule(batch_size=32, single_class=True, ghost_size=10, seed=seed, label_noise=label_noise)
    return DigitsCNN(lr=0.05, momentum=0.9, ghost_batch_norm=True, schedule="cosine"), datamodule


def digits_factored_workload(seed: int = 0) -> tuple[DigitsCNN, DigitsDataModule]:
    """The model and datamodule of configs/digits_factored.yaml (shuffled batches of 32, plain SGD)."""
    return DigitsCNN(lr=0.1, momentum=0.0, schedule="constant"), DigitsDataModule(batch_size=32, seed=seed)


def trace_modes(
    model: pl.LightningModule, datamodule: pl.LightningDataModule, folder: Path, modes: dict[str, dict], epochs: int
) -> dict[str, Trace]:
    """One run traced once per storage mode at the same time, so all traces hold the same steps.

    ``modes`` maps a storage mode to further TraceCallback arguments (``{"compact": {"keepbits": 4}}``).
    """
    callbacks = [TraceCallback(folder / mode, storage=mode, **kwargs) for mode, kwargs in modes.items()]
    _trainer(epochs, callbacks=callbacks).fit(model, datamodule)
    return {mode: Trace(folder / mode) for mode in modes}


def storage_ratios(traces: dict[str, Trace]) -> dict[str, dict[str, float]]:
    """Per trace: stored and float32 bytes of its deltas, and their ratio."""
    out = {}
    for mode, trace in traces.items():
        nbytes = trace.nbytes()
        out[mode] = {"stored_over_float32": nbytes["stored"] / nbytes["raw"], **nbytes}
    return out


def train_digits(
    root: Path, epochs: int, seed: int, label_noise: float = 0.0
) -> tuple[DigitsCNN, DigitsDataModule, Trace]:
    """The workload of configs/digits.yaml, traced into ``root/trace``."""
    pl.seed_everything(seed, verbose=False)
    model, datamodule = digits_workload(seed, label_noise)
    trainer = _trainer(epochs, callbacks=[TraceCallback(root / "trace", overwrite=True)])
    trainer.fit(model, datamodule)
    return model.eval(), datamodule, Trace(root / "trace")


def _trainer(epochs: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, **kwargs,
    )  # fmt: skip


def single_batches(dataset: Any, ids: Sequence[int]) -> list[dict[str, Tensor]]:
    """Each example as a batch of one (the Explainer's queries)."""
    loader = DataLoader(dataset)
    return [loader.collate_fn([dataset[i]]) for i in ids]


def _batches(dataset: Any, ids: Sequence[int] | None = None, size: int = 256) -> list[dict[str, Tensor]]:
    ids = list(range(len(dataset))) if ids is None else list(ids)
    collate = DataLoader(dataset).collate_fn
    return [collate([dataset[i] for i in ids[s : s + size]]) for s in range(0, len(ids), size)]


def _our_scores(
    model: DigitsCNN, trace: Trace, queries: list[dict[str, Tensor]], norms: bool
) -> tuple[dict[str, dict[str, Tensor]], Tensor, Tensor]:
    """Per layer, ``{"gamma": (Q, n), "cosine": (Q, n)}`` example scores, the predictions and the trace's labels."""
    explainer = Explainer(model, trace, norms=norms)
    predicted = explainer.set_queries(queries).argmax(-1).cpu()
    scores: dict[str, dict[str, Tensor]] = {}
    labels = torch.empty(0, dtype=torch.long)
    for name, a in explainer.run().items():
        gamma, labels = example_attribution(trace, a.gamma, explainer.stop)
        scores[name] = {"gamma": gamma}
        if norms:
            scores[name]["cosine"] = example_attribution(trace, a.cos, explainer.stop, split=False)[0]
    return scores, predicted, labels


# ---------------------------------------------------------------------- the three evaluations


def identical_class_test(
    model: DigitsCNN, datamodule: DigitsDataModule, trace: Trace, queries: Sequence[int], log: Log
) -> dict[str, float]:
    """Identical-class test for every method on the same model and test inputs."""
    test, train = datamodule.test_dataset, datamodule.train_dataset
    result: dict[str, float] = {}
    log(f"  ours: one pass over {trace.num_steps} steps for {len(queries)} test inputs")
    train_batches, test_batches = _batches(train), _batches(test, queries)
    ours, predicted, labels = _our_scores(model, trace, single_batches(test, queries), norms=True)
    for layer, by_score in ours.items():
        for score, s in by_score.items():
            result[f"ours {layer} ({score})"] = identical_class(s, labels, predicted)
    log("  Representer Points: fine-tuning the last layer")
    rp = RepresenterPoints(model).fit(train_batches)
    values, rp_predicted = rp.values(test_batches)
    train_labels = rp.labels.cpu()
    result["Representer Points"] = identical_class(values.cpu(), train_labels, rp_predicted.cpu())
    tracin = TracIn(model, trace)
    log(f"  TracIn: {len(tracin.checkpoints)} checkpoints rebuilt from the trace")
    for cosine, kind in ((False, "dot"), (True, "cosine")):
        for layer, s in tracin.scores(train_batches, test_batches, cosine=cosine).items():
            result[f"TracIn {layer} ({kind})"] = identical_class(s.cpu(), train_labels, predicted)
    return result


def mislabel_detection(
    model: DigitsCNN, datamodule: DigitsDataModule, trace: Trace, fractions: Sequence[float], log: Log
) -> dict[str, dict[str, float]]:
    """Share of flipped labels in the top fractions of the self-influence ranking, for every method."""
    train = datamodule.train_dataset
    flipped = datamodule.flipped
    n = len(train)
    ranking: dict[str, Tensor] = {}
    log(f"  ours: self-influence of {n} training examples (each its own query)")
    train_batches = _batches(train)
    ours, _, _ = _our_scores(model, trace, single_batches(train, range(n)), norms=True)
    diagonal = torch.arange(n)
    for layer, by_score in ours.items():
        for score, s in by_score.items():
            ranking[f"ours {layer} ({score})"] = s[diagonal, diagonal]
            ranking[f"ours {layer} ({score}, lowest first)"] = -s[diagonal, diagonal]
    log("  Representer Points: |alpha_i,y_i| after fine-tuning towards the training labels")
    ranking["Representer Points"] = RepresenterPoints(model, targets="labels").fit(train_batches).self_influence()
    log("  TracIn: self-influence")
    for layer, s in TracIn(model, trace).self_influence(train_batches).items():
        ranking[f"TracIn {layer} (dot)"] = s  # the cosine of a gradient with itself is 1: no ranking
    return {
        method: {f"top {f:.0%}": detection_rate(s.cpu(), flipped, f) for f in fractions}
        for method, s in ranking.items()
    }


def cladec_accuracy(
    model: DigitsCNN, datamodule: DigitsDataModule, layer: str, alphas: Sequence[float], epochs: int, log: Log
) -> dict[str, dict[str, float]]:
    """Accuracy of classifiers trained on reconstructions (ClaDec per alpha, reference autoencoder)."""
    train, test = datamodule.train_dataset, datamodule.test_dataset
    log(f"  training ClaDec (alpha {', '.join(f'{a:g}' for a in alphas)}) and the reference autoencoder on {layer}")
    decoders = fit_decoders(model, layer, train, alphas, epochs)
    train_batches, test_batches = _batches(train), _batches(test)
    x_orig = torch.cat([b["x"] for b in test_batches])
    result: dict[str, dict[str, float]] = {}
    for name, cladec in decoders.items():
        log(f"  {name}: a fresh classifier on the reconstructions")
        x_train, y_train = reconstruct_all(cladec, train_batches)
        x_test, y_test = reconstruct_all(cladec, test_batches)
        with torch.no_grad():
            fidelity = float((model(x_test.to(model.device)).argmax(-1).cpu() == y_test).double().mean())
        result[name] = {
            "accuracy_trained_on_reconstructions": _classifier_accuracy(x_train, y_train, x_test, y_test),
            "accuracy_of_the_explained_model_on_reconstructions": fidelity,
            "test_mse": float((x_test - x_orig).pow(2).mean()),
        }
    return result


def _classifier_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, epochs: int = 10) -> float:
    """A fresh DigitsCNN (plain batch norm, shuffled batches) trained on ``x_train``, its accuracy on ``x_test``."""
    pl.seed_everything(0, verbose=False)
    classifier = DigitsCNN(lr=0.05, batch_norm=True, schedule="cosine")
    data = IndexedDataset(TensorDataset(x_train, y_train))
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    _trainer(epochs).fit(classifier, loader)
    classifier.eval()
    with torch.no_grad():
        predicted = classifier(x_test.to(classifier.device)).argmax(-1).cpu()
    return float((predicted == y_test).double().mean())


# ---------------------------------------------------------------------- the table and the CLI


def markdown(result: dict[str, Any]) -> str:
    """The README's table: one row per method, identical-class and both detection rates."""
    ic, ml = result["identical_class"], result["mislabel_detection"]
    lines = [
        "| method | identical class (top-1) | flipped in top 10% | flipped in top 20% |",
        "|---|---|---|---|",
    ]
    methods: list[str] = []
    for m in ic:  # each method, then its "lowest first" ranking right below
        methods += [m] + [m[:-1] + ", lowest first)"] * (m[:-1] + ", lowest first)" in ml)
    methods += [m for m in ml if m not in methods]
    for m in methods:
        mislabel = ml.get(m)
        cells = [f"{ic[m]:.2f}" if m in ic else "n/a"] + (
            [f"{v:.2f}" for v in mislabel.values()] if mislabel else ["n/a", "n/a"]
        )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| decoder | classifier trained on reconstructions | explained model on them | test MSE |"]
    lines.append("|---|---|---|---|")
    for name, r in result["cladec"].items():
        lines.append(
            f"| {name} | {r['accuracy_trained_on_reconstructions']:.3f} | "
            f"{r['accuracy_of_the_explained_model_on_reconstructions']:.3f} | {r['test_mse']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    out: str | Path = "runs/evaluate",
    epochs: int = 10,
    seed: int = 0,
    label_noise: float = 0.1,
    queries: int | None = None,
    cladec_layer: str = "net.fc1",
    cladec_alpha: float = 0.1,
    cladec_epochs: int = 30,
    log: Log = print,
) -> dict[str, Any]:
    """Run the three evaluations; writes ``evaluation.json`` and ``evaluation.md`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[1/5] training digits ({epochs} epochs, clean labels), traced")
    model, datamodule, trace = train_digits(out / "clean", epochs, seed)
    n_test = len(datamodule.test_dataset)
    ids = list(range(n_test if queries is None else min(queries, n_test)))
    log(f"[2/5] identical-class test on {len(ids)} test inputs")
    identical = identical_class_test(model, datamodule, trace, ids, log)
    log(f"[3/5] training digits with {label_noise:.0%} of the training labels flipped, traced")
    noisy_model, noisy_data, noisy_trace = train_digits(out / "noisy", epochs, seed, label_noise)
    log("[4/5] mislabel detection by self-influence")
    mislabel = mislabel_detection(noisy_model, noisy_data, noisy_trace, (0.1, 0.2), log)
    log(f"[5/5] ClaDec on {cladec_layer}")
    cladec = cladec_accuracy(model, datamodule, cladec_layer, (0.0, cladec_alpha), cladec_epochs, log)
    result = {
        "workload": "configs/digits.yaml",
        "epochs": epochs,
        "seed": seed,
        "label_noise": label_noise,
        "flipped": len(noisy_data.flipped),
        "test_queries": len(ids),
        "identical_class": identical,
        "mislabel_detection": mislabel,
        "cladec_layer": cladec_layer,
        "cladec": cladec,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    (out / "evaluation.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tracetrain.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default="runs/evaluate", help="output folder (default: runs/evaluate)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of both runs (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.1, help="share of flipped labels (default 0.1)")
    parser.add_argument("--queries", type=int, default=None, help="first N test inputs (default: all)")
    parser.add_argument("--cladec-layer", default="net.fc1", help="layer ClaDec decodes (default net.fc1)")
    parser.add_argument("--cladec-alpha", type=float, default=0.1, help="classification weight (default 0.1)")
    parser.add_argument("--cladec-epochs", type=int, default=30, help="decoder training epochs (default 30)")
    args = parser.parse_args(argv)
    result = evaluate(
        args.out, args.epochs, args.seed, args.label_noise, args.queries, args.cladec_layer, args.cladec_alpha,
        args.cladec_epochs,
    )  # fmt: skip
    print()
    print(markdown(result))
    print(f"{result['seconds']} s; wrote {args.out}/evaluation.json and {args.out}/evaluation.md")
    return result


if __name__ == "__main__":
    main()
