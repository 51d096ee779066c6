"""Our method judged by quanda's metrics beside quanda's own wrappers of TracInCP, TRAK and Representer Points.

The digits workload of configs/digits.yaml is trained once with tracing; the
same model, training set and test digits go to every method:

- ours, per traced layer, with Algorithm 1's ``gamma`` and ``cosine`` scores, and two
  remedies for the top-k cardinality problem: ``gamma`` with each step divided by its
  mean size over the queries (``per_step="contrast"``) and ``gamma`` without the first
  epoch's steps (``warmup_steps``), through :class:`lightning_tracetrain.quanda.TraceExplainer`;
- quanda's ``CaptumTracInCP`` (the final checkpoint, all layers), ``TRAK`` (basic
  projector, CPU) and ``RepresenterPoints`` (features ``net.relu3``, classifier ``net.fc2``).

Metrics (quanda's): identical class (``ClassDetectionMetric``, top-1 against the
predicted class), top-k cardinality (``TopKCardinalityMetric``, k = 5: the share of
distinct examples among all queries' top 5), model randomization
(``ModelRandomizationMetric``: Spearman between the explanations of the trained and
of a randomized model; lower is better) and, on a second run with 10% of the
training labels flipped, mislabel detection (``MislabelingDetectionMetric``: the
area under the curve of flipped labels found when examples are checked in order
of self-influence; 0.5 is chance; ours also with ``self_influence="opposed"``),
on a third run where half of one class's training images carry a bright 2x2
patch, shortcut detection (``ShortcutDetectionMetric``: for patched test digits of
other classes that the model now assigns to the patched class, the area under the
precision-recall curve of the patched training images in the explanation; chance
is their share of the training set), and the linear datamodeling score
(``LinearDatamodelingMetric``: the model retrained from the same initialization on
``--subsets`` random halves of the training set; per query, the Spearman
correlation over the subsets between the sum of a method's scores over a subset
and the retrained model's logit margin for the query's true class; its mean over
the queries with a bootstrap 95% interval). A trace belongs to the trained
weights, so our explainer refuses a randomized model: the table says so instead
of a number.

    pip install --no-deps quanda==0.5.0   # quanda's pins clash with zarr's numpy; `make test` installs it
    python benchmarks/quanda_suite.py [--epochs 10] [--queries 100] [--subsets 250]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Subset

from lightning_tracetrain.batch import IndexedDataset
from lightning_tracetrain.exceptions import TraceMismatchError
from lightning_tracetrain.workloads.config import build
from lightning_tracetrain.workloads.data.base import paint_patch
from lightning_tracetrain.workloads.runs import train_traced, trainer, write_result

SHORTCUT_CLASS = 6  # half of its training images carry the patch in the shortcut run


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--subsets", type=int, default=250, help="random halves retrained for LDS (0: no LDS)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quanda_digits_cpu.json"))
    return parser


def methods(trace: Any, ckpt: str, cache: str, warmup: int) -> dict[str, tuple[type, dict[str, Any]]]:
    """Every method as (quanda explainer class, its keyword arguments besides model and train_dataset)."""
    from quanda.explainers.wrappers import TRAK, CaptumTracInCP, RepresenterPoints  # quanda: --help runs without

    from lightning_tracetrain.quanda import TraceExplainer

    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for layer in trace.layers:
        for score in ("gamma", "cosine"):
            out[f"ours {layer} {score}"] = (TraceExplainer, {"trace": trace, "layer": layer, "score": score})
        out[f"ours {layer} gamma, per-step contrast"] = (
            TraceExplainer, {"trace": trace, "layer": layer, "score": "gamma", "per_step": "contrast"},
        )  # fmt: skip
        out[f"ours {layer} gamma, first epoch left out"] = (
            TraceExplainer, {"trace": trace, "layer": layer, "score": "gamma", "warmup_steps": warmup},
        )  # fmt: skip
    out["TracInCP (quanda/captum)"] = (CaptumTracInCP, {"checkpoints": [ckpt], "batch_size": 64})
    out["TRAK (quanda)"] = (
        TRAK, {"model_id": "trak", "cache_dir": cache, "checkpoints": [ckpt], "projector": "basic", "proj_dim": 512},
    )  # fmt: skip
    out["Representer Points (quanda)"] = (
        RepresenterPoints,
        {"model_id": "rp", "cache_dir": cache, "features_layer": "net.relu3", "classifier_layer": "net.fc2",
         "epoch": 500},  # quanda's default 3000 epochs of fitting the representer weights: 2.5 min here for the same
    )  # fmt: skip
    return out


def evaluate(name: str, cls: type, kwargs: dict[str, Any], env: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Identical class, top-k cardinality and model randomization of one method; its scores for the true labels
    (what LDS reads) under ``"scores_for_labels"``."""
    from quanda.metrics.downstream_eval import ClassDetectionMetric
    from quanda.metrics.heuristics import ModelRandomizationMetric, TopKCardinalityMetric

    from lightning_tracetrain.quanda import TraceExplainer

    model, train, x, targets = env["model"], env["train"], env["x"], env["targets"]
    start = time.perf_counter()
    try:
        explainer = cls(model=model, train_dataset=train, **kwargs)
        scores = explainer.explain(x, targets=targets).detach().cpu()
        seconds = time.perf_counter() - start  # one explanation of the queries, as the table reports
        # ours does not read targets; the peers explain the true labels' loss for LDS's true-class margin
        for_labels = scores if cls is TraceExplainer else explainer.explain(x, targets=env["labels"]).detach().cpu()
    except Exception as exc:  # a peer that does not run here: say why instead of a number
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    row: dict[str, Any] = {"seconds": seconds, "scores_for_labels": for_labels}
    detection = ClassDetectionMetric(model, train, s=1)
    detection.update(scores, test_targets=targets)
    row["identical_class"] = float(detection.compute()["score"])
    cardinality = TopKCardinalityMetric(model, train, top_k=top_k)
    cardinality.update(scores)
    row["top_k_cardinality"] = float(cardinality.compute()["score"])
    try:
        randomization = ModelRandomizationMetric(
            model=model, model_id=re.sub(r"\W+", "_", name), cache_dir=env["cache"], train_dataset=train,
            checkpoints=[env["ckpt"]], explainer_cls=cls, seed=0,
            expl_kwargs=_own(kwargs),
        )  # fmt: skip
        randomization.update(scores, test_data=x, test_targets=targets)
        row["model_randomization"] = float(randomization.compute()["score"])
    except TraceMismatchError:
        row["model_randomization"] = "refused: a trace belongs to the trained weights"
    except Exception as exc:
        row["model_randomization"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def _number(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"| method | identical class (top-1) | top-{result['top_k']} cardinality | model randomization (Spearman, "
        "lower is better) | mislabel detection (AUC) | shortcut detection (AUPRC) | LDS (Spearman, 95% CI) "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a | n/a | {row['error']} |")
            continue
        auc = _number(row.get("mislabel_detection_auc", "not run"), 3)
        if "mislabel_detection_auc_opposed" in row:
            auc += f" (opposed: {_number(row['mislabel_detection_auc_opposed'], 3)})"
        lds = row.get("lds", "not run")
        lds = f"{lds['mean']:.3f} [{lds['ci95'][0]:.3f}, {lds['ci95'][1]:.3f}]" if isinstance(lds, dict) else lds
        lines.append(
            f"| {name} | {row['identical_class']:.2f} | {row['top_k_cardinality']:.2f} "
            f"| {_number(row['model_randomization'], 3)} | {auc} | {_number(row.get('shortcut_auprc', 'not run'), 3)} "
            f"| {lds} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def mislabel_detection(cls: type, kwargs: dict[str, Any], env: dict[str, Any]) -> float | str:
    """quanda's mislabel-detection AUC of a method's self-influence on the noisy run."""
    from quanda.metrics.downstream_eval import MislabelingDetectionMetric

    try:
        metric = MislabelingDetectionMetric(
            model=env["model"], train_dataset=env["train"], mislabeling_indices=env["flipped"], explainer_cls=cls,
            expl_kwargs=_own(kwargs), checkpoints=[env["ckpt"]],
        )  # fmt: skip
        return float(metric.compute()["score"])
    except Exception as exc:  # a peer that does not run here: say why instead of a number
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def shortcut_detection(cls: type, kwargs: dict[str, Any], env: dict[str, Any]) -> float | str:
    """quanda's shortcut-detection AUPRC of a method on the shortcut run's patched queries."""
    from quanda.metrics.downstream_eval import ShortcutDetectionMetric

    try:
        scores = cls(model=env["model"], train_dataset=env["train"], **kwargs).explain(env["x"], targets=env["targets"])
        metric = ShortcutDetectionMetric(
            env["model"], env["train"], shortcut_indices=env["shortcut_ids"], shortcut_cls=SHORTCUT_CLASS,
            checkpoints=[env["ckpt"]],
        )  # fmt: skip
        metric.update(scores.detach().cpu(), test_data=env["x"], test_labels=env["labels"])
        return float(metric.compute()["score"])
    except Exception as exc:  # a peer that does not run here: say why instead of a number
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _own(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A method's arguments for a quanda metric that builds the explainer itself (it passes the checkpoints)."""
    return {k: v for k, v in kwargs.items() if k != "checkpoints"}


def traced_run(args: argparse.Namespace, folder: Path, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The digits workload with ``data`` overrides, traced, and its final weights saved for quanda."""
    model, datamodule, trace = train_traced("digits", folder / f"{name}-trace", args.epochs, data=data)
    ckpt = str(folder / f"{name}.pt")
    torch.save(model.state_dict(), ckpt)
    train = datamodule.train_dataset.dataset  # (x, y) pairs as the model was trained on them, as quanda reads them
    cache = folder / f"{name}-cache"
    cache.mkdir()
    return {"model": model, "datamodule": datamodule, "train": train, "ckpt": ckpt, "trace": trace, "cache": str(cache)}


def shortcut_queries(env: dict[str, Any], limit: int) -> dict[str, Any]:
    """Test digits of the other classes with the patch painted on that the model now assigns to the patched class."""
    x, y = env["datamodule"].test_dataset.dataset.tensors
    painted, labels = paint_patch(x[y != SHORTCUT_CLASS]), y[y != SHORTCUT_CLASS]
    with torch.no_grad():
        predicted = env["model"](painted).argmax(1)
    fooled = predicted == SHORTCUT_CLASS
    env["shortcut_ids"] = env["datamodule"].shortcut_ids.tolist()
    env["fooled_share"] = float(fooled.float().mean())
    env |= {"x": painted[fooled][:limit], "labels": labels[fooled][:limit], "targets": predicted[fooled][:limit]}
    return env


def lds_subsets(args: argparse.Namespace, env: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The digits model retrained from the same initialization on ``--subsets`` random halves of the training
    set (single-class batches of the half): the subsets, their checkpoints and their logits for the queries."""
    n = len(env["train"])
    g = torch.Generator().manual_seed(0)
    ids = [torch.randperm(n, generator=g)[: n // 2].sort().values.tolist() for _ in range(args.subsets)]
    folder.mkdir()
    files, logits, start = [], {}, time.perf_counter()
    for s, subset in enumerate(ids):
        pl.seed_everything(0, verbose=False)
        model, datamodule = build("digits", data={"seed": 0})
        datamodule.setup("fit")
        datamodule.train_dataset = IndexedDataset(Subset(datamodule.train_dataset.dataset, subset))
        trainer(args.epochs).fit(model, datamodule)
        files.append(str(folder / f"subset_{s}.pt"))
        torch.save(model.state_dict(), files[-1])
        with torch.no_grad():
            logits[s] = model.eval()(env["x"])
        if (s + 1) % 50 == 0 or s + 1 == len(ids):
            print(f"LDS: {s + 1}/{len(ids)} subsets retrained, {time.perf_counter() - start:.0f} s", flush=True)
    return {"ids": ids, "files": files, "logits": logits, "seconds": time.perf_counter() - start}


def lds(scores: Tensor, env: dict[str, Any], subsets: dict[str, Any]) -> dict[str, Any]:
    """quanda's linear datamodeling score of ``scores`` (queries x training examples) over the retrained subsets:
    the mean over the queries of each query's Spearman correlation, and a bootstrap 95% interval over queries."""
    from quanda.metrics.ground_truth import LinearDatamodelingMetric

    metric = LinearDatamodelingMetric(
        model=env["model"], train_dataset=env["train"], m=len(subsets["ids"]), alpha=0.5, checkpoints=[env["ckpt"]],
        subset_ids=subsets["ids"], subset_ckpt_filenames=subsets["files"], cache_dir=env["cache"],
    )  # fmt: skip
    metric.update(scores, test_targets=env["labels"], test_data=env["x"], subset_logits=subsets["logits"])
    per_query = torch.cat(metric.state_dict()["scores"]).float()
    per_query = per_query[per_query.isfinite()]  # a query whose scores are all equal has no rank correlation
    g = torch.Generator().manual_seed(0)
    means = per_query[torch.randint(len(per_query), (2000, len(per_query)), generator=g)].mean(1)
    low, high = means.quantile(torch.tensor([0.025, 0.975])).tolist()
    return {"mean": float(per_query.mean()), "ci95": [low, high], "queries": len(per_query)}


def main() -> None:
    args = parser().parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # quanda's wrappers print a progress bar per epoch
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one info line per retrained subset
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = traced_run(args, folder, "clean", {})
        test = env["datamodule"].test_dataset.dataset  # (x, y) pairs, as quanda reads them
        env["x"], env["labels"] = test.tensors[0][: args.queries], test.tensors[1][: args.queries]
        with torch.no_grad():
            env["targets"] = env["model"](env["x"]).argmax(1)
        warmup = int((env["trace"].steps.epoch == 0).sum())
        rows = {}
        for name, (cls, kwargs) in methods(env["trace"], env["ckpt"], env["cache"], warmup).items():
            pl.seed_everything(0, verbose=False)
            rows[name] = evaluate(name, cls, kwargs, env, args.top_k)
            print(name, {k: v for k, v in rows[name].items() if k != "scores_for_labels"}, flush=True)
        noisy = traced_run(args, folder, "noisy", {"label_noise": 0.1})
        noisy["flipped"] = noisy["datamodule"].flipped.tolist()
        for name, (cls, kwargs) in methods(noisy["trace"], noisy["ckpt"], noisy["cache"], warmup).items():
            if "error" not in rows[name] and "first epoch" not in name and "contrast" not in name:
                pl.seed_everything(0, verbose=False)
                rows[name]["mislabel_detection_auc"] = mislabel_detection(cls, kwargs, noisy)
                if name.startswith("ours"):
                    opposed = {**kwargs, "self_influence": "opposed"}
                    rows[name]["mislabel_detection_auc_opposed"] = mislabel_detection(cls, opposed, noisy)
                print(name, "mislabel detection", rows[name]["mislabel_detection_auc"], flush=True)
        shortcut = shortcut_queries(traced_run(args, folder, "shortcut", {"shortcut": 0.5}), args.queries)
        for name, (cls, kwargs) in methods(shortcut["trace"], shortcut["ckpt"], shortcut["cache"], warmup).items():
            if "error" not in rows[name]:
                pl.seed_everything(0, verbose=False)
                rows[name]["shortcut_auprc"] = shortcut_detection(cls, kwargs, shortcut)
                print(name, "shortcut detection", rows[name]["shortcut_auprc"], flush=True)
        subsets = lds_subsets(args, env, folder / "lds") if args.subsets else None
        for name, row in rows.items():
            scores = row.pop("scores_for_labels", None)
            if subsets is not None and scores is not None:
                row["lds"] = lds(scores, env, subsets)
                print(name, "LDS", row["lds"], flush=True)
    result = {
        "benchmark": "quanda's metrics: ours per layer and quanda's wrappers of TracInCP, TRAK, Representer Points",
        "command": f"python benchmarks/quanda_suite.py --epochs {args.epochs} --queries {args.queries} "
        f"--subsets {args.subsets}",
        "epochs": args.epochs,
        "queries": args.queries,
        "top_k": args.top_k,
        "first_epoch_steps": warmup,
        "shortcut": {
            "class": SHORTCUT_CLASS,
            "painted_training_images": len(shortcut["shortcut_ids"]),
            "share_of_training_set": len(shortcut["shortcut_ids"]) / len(shortcut["train"]),
            "painted_test_digits_assigned_to_the_class": shortcut["fooled_share"],
            "queries": len(shortcut["x"]),
        },
        "lds": None if subsets is None else {"subsets": args.subsets, "alpha": 0.5, "seconds": subsets["seconds"]},
        "seconds": time.perf_counter() - started,
        "methods": rows,
    }
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
