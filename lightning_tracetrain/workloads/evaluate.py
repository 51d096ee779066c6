"""``python -m lightning_tracetrain evaluate``: our attribution beside Representer Points, TracIn and ClaDec on digits.

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

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_tracetrain.baselines import RepresenterPoints, TracIn, fit_decoders
from lightning_tracetrain.baselines.cladec import reconstruct_all
from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.console import add_debug_flag, command
from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.explain.arguments import dataclass_parser, option, parse
from lightning_tracetrain.trace import Trace
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.metrics import detection_rate, identical_class
from lightning_tracetrain.workloads.runs import batches, single_batches, train_traced, trainer

Log = Callable[[str], None]


@dataclass
class EvaluateArguments:
    """Our attribution beside Representer Points, TracIn and ClaDec on digits (configs/digits.yaml)."""

    out: str = option("output folder", "runs/evaluate")
    epochs: int = option("training epochs of both runs", 10)
    seed: int = option("seed of the data split, batches and initialization", 0)
    label_noise: float = option("share of training labels flipped for mislabel detection", 0.1)
    queries: int | None = option("explain the first N test inputs (default: all)", None, metavar="N")
    cladec_layer: str = option("layer ClaDec decodes", "net.fc1")
    cladec_alpha: float = option("ClaDec's classification weight", 0.1)
    cladec_epochs: int = option("decoder training epochs", 30)
    classifier_epochs: int = option("epochs of the fresh classifiers trained on reconstructions", 10)

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0.0 <= self.label_noise <= 1.0 or (self.queries is not None and self.queries < 1):
            raise ValueError("--epochs and --queries must be at least 1 and --label-noise in [0, 1].")


# ---------------------------------------------------------------------- the three evaluations


def _our_scores(
    model: pl.LightningModule, trace: Trace, queries: list[dict[str, Tensor]], norms: bool
) -> tuple[dict[str, dict[str, Tensor]], Tensor, Tensor]:
    """Per layer, ``{"gamma": (Q, n), "cosine": (Q, n)}`` example scores, the predictions and the trace's labels."""
    explainer = Explainer(model, trace, norms=norms)
    predicted = explainer.set_queries(queries).argmax(-1).cpu()
    scores: dict[str, dict[str, Tensor]] = {}
    labels = torch.empty(0, dtype=torch.long)
    for name, a in explainer.run().items():
        gamma, labels = example_attribution(trace.steps, trace.examples, a.gamma, explainer.stop)
        scores[name] = {"gamma": gamma}
        if norms:
            scores[name]["cosine"] = example_attribution(
                trace.steps, trace.examples, a.cos, explainer.stop, split=False
            )[0]
    return scores, predicted, labels


# ---------------------------------------------------------------------- the three evaluations


def identical_class_test(
    model: pl.LightningModule, datamodule: Any, trace: Trace, queries: Sequence[int], log: Log
) -> dict[str, float]:
    """Identical-class test for every method on the same model and test inputs."""
    test, train = datamodule.test_dataset, datamodule.train_dataset
    result: dict[str, float] = {}
    log(f"  ours: one pass over {trace.num_steps} steps for {len(queries)} test inputs")
    train_batches, test_batches = batches(train), batches(test, queries)
    ours, predicted, labels = _our_scores(model, trace, single_batches(test, queries), norms=True)
    for layer, by_score in ours.items():
        for score, s in by_score.items():
            result[f"ours {layer} ({score})"] = identical_class(s, labels, predicted)
    log("  Representer Points: fine-tuning the last layer")
    rp = RepresenterPoints(model).fit(train_batches)
    train_labels = rp.labels.cpu()
    for convention, name in (("logits", "Representer Points"), ("authors", "Representer Points (authors' kernel)")):
        rp.convention = convention  # the same fine-tuned layer and alpha; the values differ by alpha_ic
        values, rp_predicted = rp.values(test_batches)
        result[name] = identical_class(values.cpu(), train_labels, rp_predicted.cpu())
    tracin = TracIn(model, trace)
    log(f"  TracIn: {len(tracin.checkpoints)} checkpoints rebuilt from the trace")
    for cosine, kind in ((False, "dot"), (True, "cosine")):
        for layer, s in tracin.scores(train_batches, test_batches, cosine=cosine).items():
            result[f"TracIn {layer} ({kind})"] = identical_class(s.cpu(), train_labels, predicted)
    return result


def mislabel_detection(
    model: pl.LightningModule, datamodule: Any, trace: Trace, fractions: Sequence[float], log: Log
) -> dict[str, dict[str, float]]:
    """Share of flipped labels in the top fractions of the self-influence ranking, for every method."""
    train = datamodule.train_dataset
    flipped = datamodule.flipped
    n = len(train)
    ranking: dict[str, Tensor] = {}
    log(f"  ours: self-influence of {n} training examples (each its own query)")
    train_batches = batches(train)
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
    model: pl.LightningModule,
    datamodule: Any,
    layer: str,
    alphas: Sequence[float],
    epochs: int,
    log: Log,
    classifier_epochs: int = 10,
) -> dict[str, dict[str, float]]:
    """Accuracy of classifiers trained on reconstructions (ClaDec per alpha, reference autoencoder)."""
    train, test = datamodule.train_dataset, datamodule.test_dataset
    log(f"  training ClaDec (alpha {', '.join(f'{a:g}' for a in alphas)}) and the reference autoencoder on {layer}")
    decoders = fit_decoders(model, layer, train, alphas, epochs)
    train_batches, test_batches = batches(train), batches(test)
    x_orig = torch.cat([b["x"] for b in test_batches])
    result: dict[str, dict[str, float]] = {}
    for name, cladec in decoders.items():
        log(f"  {name}: a fresh classifier on the reconstructions")
        x_train, y_train = reconstruct_all(cladec, train_batches)
        x_test, y_test = reconstruct_all(cladec, test_batches)
        with torch.no_grad():
            fidelity = float((model(x_test.to(model.device)).argmax(-1).cpu() == y_test).double().mean())
        result[name] = {
            "accuracy_trained_on_reconstructions": _classifier_accuracy(
                x_train, y_train, x_test, y_test, classifier_epochs
            ),
            "accuracy_of_the_explained_model_on_reconstructions": fidelity,
            "test_mse": float((x_test - x_orig).pow(2).mean()),
        }
    return result


def _classifier_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, epochs: int = 10) -> float:
    """A fresh digits CNN (configs/digits.yaml with plain batch norm, shuffled batches) trained on ``x_train``,
    its accuracy on ``x_test``."""
    pl.seed_everything(0, verbose=False)
    classifier, _ = build("digits", model={"ghost_batch_norm": False, "batch_norm": True})
    data = IndexedDataset(TensorDataset(x_train, y_train))
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer(epochs).fit(classifier, loader)
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


def evaluate(args: EvaluateArguments, log: Log = print) -> dict[str, Any]:
    """Run the three evaluations; writes ``evaluation.json`` and ``evaluation.md`` to ``args.out``."""
    out, epochs, seed, label_noise = Path(args.out), args.epochs, args.seed, args.label_noise
    queries, cladec_layer = args.queries, args.cladec_layer
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[1/5] training digits ({epochs} epochs, clean labels), traced")
    model, datamodule, trace = train_traced("digits", out / "clean" / "trace", epochs, seed)
    n_test = len(datamodule.test_dataset)
    ids = list(range(n_test if queries is None else min(queries, n_test)))
    log(f"[2/5] identical-class test on {len(ids)} test inputs")
    identical = identical_class_test(model, datamodule, trace, ids, log)
    log(f"[3/5] training digits with {label_noise:.0%} of the training labels flipped, traced")
    noisy_model, noisy_data, noisy_trace = train_traced(
        "digits", out / "noisy" / "trace", epochs, seed, {"label_noise": label_noise}
    )
    log("[4/5] mislabel detection by self-influence")
    mislabel = mislabel_detection(noisy_model, noisy_data, noisy_trace, (0.1, 0.2), log)
    log(f"[5/5] ClaDec on {cladec_layer}")
    cladec = cladec_accuracy(
        model, datamodule, cladec_layer, (0.0, args.cladec_alpha), args.cladec_epochs, log, args.classifier_epochs
    )
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


def parser() -> Any:
    return add_debug_flag(dataclass_parser(EvaluateArguments, "python -m lightning_tracetrain evaluate"))


@command
def main(argv: list[str]) -> dict[str, Any]:
    args = parse(EvaluateArguments, parser(), argv)
    result = evaluate(args)
    print()
    print(markdown(result))
    print(f"{result['seconds']} s; wrote {args.out}/evaluation.json and {args.out}/evaluation.md")
    return result


if __name__ == "__main__":
    main()
