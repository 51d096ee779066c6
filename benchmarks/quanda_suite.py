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
of self-influence; 0.5 is chance). A trace belongs to the trained weights, so
our explainer refuses a randomized model: the table says so instead of a number.

    pip install --no-deps quanda==0.5.0   # quanda's pins clash with zarr's numpy; `make test` installs it
    python benchmarks/quanda_suite.py [--epochs 10] [--queries 100]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tracetrain.exceptions import TraceMismatchError
from lightning_tracetrain.workloads.runs import train_traced, write_result


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=5)
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
    from quanda.metrics.downstream_eval import ClassDetectionMetric
    from quanda.metrics.heuristics import ModelRandomizationMetric, TopKCardinalityMetric

    model, train, x, targets = env["model"], env["train"], env["x"], env["targets"]
    start = time.perf_counter()
    try:
        scores = cls(model=model, train_dataset=train, **kwargs).explain(x, targets=targets).detach().cpu()
    except Exception as exc:  # a peer that does not run here: say why instead of a number
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    row: dict[str, Any] = {"seconds": time.perf_counter() - start}
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


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"| method | identical class (top-1) | top-{result['top_k']} cardinality | model randomization (Spearman, "
        "lower is better) | mislabel detection (AUC) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | {row['error']} |")
            continue
        mr = row["model_randomization"]
        mr = f"{mr:.3f}" if isinstance(mr, float) else mr
        auc = row.get("mislabel_detection_auc", "not run")
        auc = f"{auc:.3f}" if isinstance(auc, float) else auc
        lines.append(
            f"| {name} | {row['identical_class']:.2f} | {row['top_k_cardinality']:.2f} | {mr} | {auc} "
            f"| {row['seconds']:.1f} |"
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


def _own(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A method's arguments for a quanda metric that builds the explainer itself (it passes the checkpoints)."""
    return {k: v for k, v in kwargs.items() if k != "checkpoints"}


def noisy_run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The digits workload trained with 10% of its training labels flipped, traced: what mislabel detection needs."""
    model, datamodule, trace = train_traced("digits", folder / "noisy-trace", args.epochs, data={"label_noise": 0.1})
    ckpt = str(folder / "noisy.pt")
    torch.save(model.state_dict(), ckpt)
    train = datamodule.train_dataset.dataset  # the flipped labels, as the model was trained on them
    return {"model": model, "train": train, "flipped": datamodule.flipped.tolist(), "ckpt": ckpt, "trace": trace}


def main() -> None:
    args = parser().parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # quanda's wrappers print a progress bar per epoch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, datamodule, trace = train_traced("digits", Path(tmp) / "trace", args.epochs)
        ckpt = str(Path(tmp) / "final.pt")
        torch.save(model.state_dict(), ckpt)
        test = datamodule.test_dataset.dataset  # (x, y) pairs, as quanda reads them
        x = test.tensors[0][: args.queries]
        with torch.no_grad():
            targets = model(x).argmax(1)
        env = {"model": model, "train": datamodule.train_dataset.dataset, "x": x, "targets": targets}
        env |= {"ckpt": ckpt, "cache": str(Path(tmp) / "cache")}
        Path(env["cache"]).mkdir()
        warmup = int((trace.steps.epoch == 0).sum())
        rows = {}
        for name, (cls, kwargs) in methods(trace, ckpt, env["cache"], warmup).items():
            pl.seed_everything(0, verbose=False)
            rows[name] = evaluate(name, cls, kwargs, env, args.top_k)
            print(name, rows[name], flush=True)
        noisy = noisy_run(args, Path(tmp))
        noisy["cache"] = str(Path(tmp) / "noisy-cache")
        for name, (cls, kwargs) in methods(noisy["trace"], noisy["ckpt"], noisy["cache"], warmup).items():
            if "error" not in rows[name] and "first epoch" not in name and "contrast" not in name:
                pl.seed_everything(0, verbose=False)
                rows[name]["mislabel_detection_auc"] = mislabel_detection(cls, kwargs, noisy)
                print(name, "mislabel detection", rows[name]["mislabel_detection_auc"], flush=True)
    result = {
        "benchmark": "quanda's metrics: ours per layer and quanda's wrappers of TracInCP, TRAK, Representer Points",
        "command": f"python benchmarks/quanda_suite.py --epochs {args.epochs} --queries {args.queries}",
        "epochs": args.epochs,
        "queries": args.queries,
        "top_k": args.top_k,
        "first_epoch_steps": warmup,
        "seconds": time.perf_counter() - started,
        "methods": rows,
    }
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
