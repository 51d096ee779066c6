"""``python -m lightning_tracetrain depth``: the paper's depth diagnosis on motif graphs, checked against accuracy.

The paper found the intermediate GIN layers of its ogbg-ppa model class-unspecific
and concluded that depth is wasted (a one-layer model did as well). This command
puts the diagnosis to a test it can fail: on both motif variants
(``distinct_degrees``: one GIN layer can tell the motifs apart; ``equal_degrees``:
it cannot), it trains the deep (``configs/motifs_gin.yaml``) and the shallow
(``configs/motifs_shallow.yaml``) GIN with tracing and reports, per run, the test
accuracy and per traced layer over the test set:

- class specificity: the share of positive gamma from steps of the predicted class
  (chance: the share of steps of that class, about 1/4);
- motif rate: the share of test graphs whose top-1 proponent (Algorithm 1, gamma)
  carries the test graph's motif type, and the share of the top 5 that do.

As a reference for what one GIN layer can see, a logistic regression on each
graph's degree histogram (a one-layer GIN with sum pooling computes a function
of that histogram) is fitted per variant.

Writes ``OUT/depth.json`` and ``OUT/depth.md`` (the table in the README).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_tracetrain.console import add_debug_flag, command
from lightning_tracetrain.explain import Explainer, example_attribution
from lightning_tracetrain.explain.arguments import dataclass_parser, option, parse
from lightning_tracetrain.functional import predicted_class_share
from lightning_tracetrain.singleclass.sampler import dataset_labels
from lightning_tracetrain.workloads.data.motifs import VARIANTS
from lightning_tracetrain.workloads.metrics import identical_class
from lightning_tracetrain.workloads.runs import single_batches, train_traced, trainer

MODELS = {"deep": "motifs_gin", "shallow": "motifs_shallow"}


@dataclass
class DepthArguments:
    """The paper's depth diagnosis on motif graphs: deep and shallow GIN on both variants, per layer."""

    out: str = option("output folder", "runs/depth")
    epochs: int = option("training epochs of every run", 25)
    seed: int = option("seed of the graphs, batches and initialization", 0)
    variants: list[str] = option("motif variants (distinct_degrees, equal_degrees)", list(VARIANTS))
    data_root: str = option("where the generated graphs are cached", "runs/motifs/data")
    train_graphs: int = option("training graphs per run (validation and test: a quarter each)", 800)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.train_graphs < 8:
            raise ValueError("--epochs must be at least 1 and --train-graphs at least 8.")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variant {', '.join(unknown)}; the variants are {', '.join(VARIANTS)}.")


def diagnose(config: str, variant: str, folder: Path, args: DepthArguments) -> tuple[dict[str, Any], Any]:
    """Train one config on one variant with tracing; its test accuracy and, per layer, specificity and motif rate
    (and the run's datamodule)."""
    data = {"variant": variant, "root": args.data_root, "train_graphs": args.train_graphs}
    model, datamodule, trace = train_traced(config, folder / "trace", args.epochs, args.seed, data=data)
    (tested,) = trainer(1).test(model, datamodule, verbose=False)
    test = datamodule.test_dataset
    motif = torch.from_numpy(dataset_labels(test))  # the label is the motif type
    explainer = Explainer(model, trace, norms=False)
    predicted = explainer.set_queries(single_batches(test, range(len(test)))).argmax(-1).cpu()
    step_labels = torch.from_numpy(trace.steps.label[: explainer.stop])
    layers = {}
    for name, a in explainer.run().items():
        scores, labels = example_attribution(trace.steps, trace.examples, a.gamma, explainer.stop)
        layers[name] = {
            "specificity": float(predicted_class_share(a.gamma, step_labels, predicted).mean()),
            "top1_motif": identical_class(scores, labels, motif),
            "top5_motif": identical_class(scores, labels, motif, k=5),
        }
    return {"config": config, "variant": variant, "accuracy": float(tested["test_acc"]), "layers": layers}, datamodule


def depth_diagnosis(args: DepthArguments) -> dict[str, Any]:
    """Every variant x {deep, shallow}; the runs' results and how long it all took."""
    start = time.perf_counter()
    runs, seen = {}, {}
    for variant in args.variants:
        for kind, config in MODELS.items():
            print(f"{variant}: {kind} GIN ({config}.yaml), {args.epochs} epochs, traced", flush=True)
            runs[f"{variant}/{kind}"], datamodule = diagnose(config, variant, Path(args.out) / variant / kind, args)
        seen[variant] = degree_histogram_accuracy(datamodule)  # both runs of a variant train on the same graphs
    result = {"epochs": args.epochs, "seed": args.seed, "classes": {v: VARIANTS[v] for v in args.variants}}
    result["degree_histogram_accuracy"] = seen
    result["runs"] = runs
    result["verdict"] = {v: verdict(runs[f"{v}/deep"], runs[f"{v}/shallow"]) for v in args.variants}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def degree_histogram_accuracy(datamodule: Any, max_degree: int = 16) -> float:
    """Test accuracy of a logistic regression on the graphs' degree histograms: what one GIN layer can see."""
    from sklearn.linear_model import LogisticRegression

    def histograms(dataset: Any) -> tuple[Any, Any]:
        graphs = [dataset[i] for i in range(len(dataset))]
        degrees = [torch.bincount(g.edge_index[0], minlength=g.num_nodes).clamp_max(max_degree) for g in graphs]
        return (
            torch.stack([torch.bincount(d, minlength=max_degree + 1) for d in degrees]).numpy(),
            torch.cat([g.y for g in graphs]).numpy(),
        )

    x, y = histograms(datamodule.train_dataset)
    x_test, y_test = histograms(datamodule.test_dataset)
    return float(LogisticRegression(max_iter=5000).fit(x, y).score(x_test, y_test))


def verdict(deep: dict[str, Any], shallow: dict[str, Any], chance_margin: float = 0.1) -> str:
    """Does "the intermediate layers are unspecific, so depth is wasted" agree with the accuracies?"""
    inner = [v["specificity"] for name, v in deep["layers"].items() if name.startswith("convs.")][:-2]
    unspecific = bool(inner) and max(inner) < 0.25 + chance_margin
    wasted = shallow["accuracy"] >= deep["accuracy"] - 0.05
    says = "unspecific (the diagnosis: depth is wasted)" if unspecific else "class-specific (depth is used)"
    shows = "the shallow model does as well" if wasted else "the shallow model does worse"
    agrees = "agrees" if unspecific == wasted else "DISAGREES"
    return (
        f"intermediate layers {says}; accuracy deep {deep['accuracy']:.3f}, shallow {shallow['accuracy']:.3f}: "
        f"{shows}. The diagnosis {agrees} with the accuracies."
    )


def markdown(result: dict[str, Any]) -> str:
    """The README's table: per run and layer, specificity and motif rates; then the verdicts."""
    lines = [
        "| variant | model | test acc | layer | class specificity | top-1 has the motif | top-5 with the motif |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, run in result["runs"].items():
        variant, kind = key.split("/")
        for i, (name, layer) in enumerate(run["layers"].items()):
            head = f"| {variant} | {kind} | {run['accuracy']:.3f} |" if i == 0 else "| | | |"
            rates = f"{layer['top1_motif']:.2f} | {layer['top5_motif']:.2f}"
            lines.append(f"{head} `{name}` | {layer['specificity']:.0%} | {rates} |")
    lines.append("")
    for variant, text in result["verdict"].items():
        seen = result["degree_histogram_accuracy"][variant]
        lines.append(f"- {variant}: {text} (what one layer can see: degree histogram -> {seen:.3f})")
    return "\n".join(lines)


def parser() -> Any:
    return add_debug_flag(dataclass_parser(DepthArguments, "python -m lightning_tracetrain depth", __doc__ or ""))


@command
def main(argv: list[str]) -> dict[str, Any]:
    args = parse(DepthArguments, parser(), argv)
    result = depth_diagnosis(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.json").write_text(json.dumps(result, indent=2))
    (out / "depth.md").write_text(markdown(result) + "\n")
    print()
    print(markdown(result))
    print(f"{result['seconds']} s; wrote {out}/depth.json and {out}/depth.md")
    return result


if __name__ == "__main__":
    main()
