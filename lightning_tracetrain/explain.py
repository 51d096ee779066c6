"""``python -m lightning_tracetrain.explain --ckpt CKPT --trace TRACE``: explain test inputs by the training steps.

Rebuilds the model and datamodule from what the trace recorded (query ``i`` is
the ``i``-th example of the test dataloader), makes one pass over the trace
and writes ``DIR/influence.json`` (schema in docs/influence-format.md) and a
self-contained ``DIR/report.html``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_tracetrain.baselines.cladec import fit_decoders
from lightning_tracetrain.exceptions import TraceMismatchError, TraceTrainError
from lightning_tracetrain.explainer import (
    Explainer,
    LayerAttribution,
    class_attribution,
    example_attribution,
    import_class,
    ridge_densities,
)
from lightning_tracetrain.report import examples_figure, examples_table, images_figure, ridge_figure, write_report
from lightning_tracetrain.trace import Trace


class QueryError(TraceTrainError, IndexError):
    """A query index outside the test set."""


def load_datamodule(trace: Trace) -> pl.LightningDataModule:
    if trace.datamodule is None:
        raise TraceMismatchError(
            f"The trace at {trace.path} was recorded without a LightningDataModule, so the CLI cannot find test "
            "inputs; use lightning_tracetrain.explainer.Explainer from Python with your own query batches."
        )
    datamodule = import_class(trace.datamodule)(**trace.datamodule.init_args)
    datamodule.setup("fit")
    datamodule.setup("test")
    return datamodule


def _example(index: int, label: int, score: float) -> dict[str, Any]:
    return {"example": int(index), "label": int(label), "score": float(score)}


def _image(dataset: Any, index: int) -> np.ndarray | None:
    item = dataset[index]
    return _picture(item.get("x") if isinstance(item, Mapping) else None)


def _picture(x: Any) -> np.ndarray | None:
    """A (C, H, W) or (H, W) tensor as an image array; None for graphs and other inputs (shown as a table)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return None
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)
    return x.numpy()


def explain(
    ckpt: str | Path,
    trace_path: str | Path,
    queries: Sequence[int] = (0, 1, 2),
    layers: Sequence[str] | None = None,
    top_k: int = 5,
    out: str | Path = "explanations",
    score: str = "gamma",
    privacy: bool = False,
    bandwidth: float = 0.1,
    num_workers: int = 0,
    cladec: str | None = None,
    cladec_alpha: float = 0.0,
    cladec_epochs: int = 30,
    devices: int | str = 1,
    accelerator: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Explain test inputs; writes ``influence.json`` and ``report.html`` to ``out`` and returns the JSON.

    With ``cladec`` (a layer name), ClaDec and its reference autoencoder are trained on the training
    set for that layer and each query is shown beside both reconstructions.

    With ``devices > 1`` the pass over the trace is sharded over the devices by Lightning's DDP
    (one process per device); only rank 0 writes the files, the other ranks return ``{}``.
    """
    if score not in ("gamma", "cosine"):
        raise ValueError(f"score must be 'gamma' or 'cosine', got {score!r}.")
    if cladec is not None and devices not in (1, "1"):
        raise ValueError("--cladec trains decoders on one device: explain with --devices 1 to show reconstructions.")
    trace = Trace(trace_path, storage_options)
    explainer = Explainer.from_checkpoint(ckpt, trace, layers)
    datamodule = load_datamodule(trace)
    test = datamodule.test_dataloader()
    for q in queries:
        if not 0 <= q < len(test.dataset):
            raise QueryError(
                f"Query {q} is out of range: the test set of {type(datamodule).__name__} has {len(test.dataset)} "
                f"examples (0..{len(test.dataset) - 1})."
            )
    batches = [test.collate_fn([test.dataset[q]]) for q in queries]
    logits = explainer.set_queries(batches).float().cpu()
    results = explainer.run(num_workers=num_workers, devices=devices, accelerator=accelerator)
    if explainer.global_rank_ != 0:
        return {}  # every rank holds the whole result; rank 0 writes it

    probs = logits.softmax(-1)
    train_set = datamodule.train_dataloader().dataset
    decoders = {}
    if cladec is not None and not privacy:
        decoders = fit_decoders(explainer.model, cladec, train_set, (cladec_alpha,), cladec_epochs)
    grid = torch.linspace(-1, 1, 201)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "score": score,
        "privacy": privacy,
        "trace": str(trace.path),
        "checkpoint": str(ckpt),
        "steps": explainer.stop,
        "queries": [],
    }
    if decoders:
        doc["cladec"] = {"layer": cladec, "alpha": cladec_alpha, "epochs": cladec_epochs}
    sections = []
    for qi, q in enumerate(queries):
        label = int(torch.as_tensor(test.dataset[q]["y"] if isinstance(test.dataset[q], Mapping) else -1))
        predicted = int(probs[qi].argmax())
        top_classes = probs[qi].argsort(descending=True)[:10].tolist()
        entry: dict[str, Any] = {
            "query": q,
            "label": label,
            "predicted": predicted,
            "probabilities": [round(float(p), 6) for p in probs[qi]],
            "layers": {},
        }
        items: list[Any] = []
        if not privacy:
            shown = [{"example": q, "label": label, "score": float(probs[qi, predicted])}]
            query_fig = examples_figure(shown, lambda i: _image(test.dataset, i), "the query (test example, p)")
            if query_fig is not None and decoders:
                x = test.dataset[q]["x"][None]
                pictures = [_picture(x[0])] + [_picture(d.reconstruct(x)[0]) for d in decoders.values()]
                titles = ["the query", *(f"{name}<br>from {cladec}" for name in decoders)]
                query_fig = images_figure(
                    pictures,
                    titles,
                    f"the query (p={float(probs[qi, predicted]):.2f}) and "
                    f"what {cladec} keeps of it (ClaDec vs reference autoencoder)",
                )
            items += [query_fig] if query_fig is not None else []
        for name, attribution in results.items():
            layer_doc, figs = _layer(trace, explainer.stop, attribution, qi, name, score, top_k, privacy)
            entry["layers"][name] = layer_doc
            densities = {
                c: d.numpy() for c, d in ridge_densities(attribution, trace.steps.label, qi, grid, bandwidth).items()
            }
            items.append(
                ridge_figure(
                    grid.numpy(),
                    densities,
                    top_classes,
                    predicted,
                    f"{name}: cos of each step's contribution, by the step's class",
                )
            )
            if not privacy:
                for kind, examples in figs:
                    if not examples:
                        items.append(f"<p>{name}: no {kind} (no training example has a negative score).</p>")
                        continue
                    fig = examples_figure(examples, lambda i: _image(train_set, i), f"{name}: {kind}")
                    items.append(fig if fig is not None else f"<h4>{name}: {kind}</h4>" + examples_table(examples))
        doc["queries"].append(entry)
        sections.append(
            {
                "heading": f"Query {q}: label {label}, predicted {predicted} (p={float(probs[qi, predicted]):.2f})",
                "items": items,
            }
        )
    (out_dir / "influence.json").write_text(json.dumps(doc, indent=1))
    write_report(out_dir / "report.html", sections, f"Why did the model learn this? ({trace.module.class_path})")
    return doc


def _layer(
    trace: Trace, stop: int, a: LayerAttribution, qi: int, name: str, score: str, top_k: int, privacy: bool
) -> tuple[dict[str, Any], list[tuple[str, list[dict[str, Any]]]]]:
    step_scores = (a.gamma if score == "gamma" else a.cos)[qi : qi + 1]
    rows = None if a.rows is None else a.rows[qi : qi + 1]  # a factored layer: each example's exact share
    per_example, labels = example_attribution(
        trace, step_scores, stop, split=score == "gamma", rows=rows if score == "gamma" else None
    )
    # class scores are always shares of gamma (they add up to ||Z||^2 with init_score)
    gamma_examples = (
        per_example if score == "gamma" else example_attribution(trace, a.gamma[qi : qi + 1], stop, rows=rows)[0]
    )
    classes = class_attribution(gamma_examples, labels)
    doc: dict[str, Any] = {
        # exact: every example's own share of gamma (factored layer); else a step's gamma split equally
        "example_shares": "exact" if rows is not None else "equal split of each step",
        "class_scores": dict(sorted(((str(c), float(v[0])) for c, v in classes.items()), key=lambda kv: -kv[1])),
        "init_score": float(a.init[qi]),
        "norm_sq": float(a.z_sq[qi]),
        "completeness_residual": float(a.residual[qi]),
    }
    if privacy:
        return doc, []
    s = per_example[0]
    seen = labels >= 0
    k = min(top_k, int(seen.sum()))
    order = torch.argsort(torch.where(seen, s, torch.full_like(s, -torch.inf)), descending=True)[:k]
    worst = torch.argsort(torch.where(seen, s, torch.full_like(s, torch.inf)))[:k]
    doc["top_examples"] = [_example(i, labels[i], s[i]) for i in order.tolist()]
    doc["opponents"] = [_example(i, labels[i], s[i]) for i in worst.tolist() if s[i] < 0]
    return doc, [("most influential training examples", doc["top_examples"]), ("strongest opponents", doc["opponents"])]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m lightning_tracetrain.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the traced run")
    parser.add_argument("--trace", required=True, help="the trace directory")
    parser.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="test-set indices (default 0 1 2)")
    parser.add_argument("--layers", nargs="+", default=None, help="layers to explain (default: all traced)")
    parser.add_argument("--top-k", type=int, default=5, help="training examples to list per layer (default 5)")
    parser.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    parser.add_argument(
        "--score",
        choices=["gamma", "cosine"],
        default="gamma",
        help="rank examples by summed gamma (Algorithm 1, default) or summed cosine",
    )
    parser.add_argument("--privacy", action="store_true", help="class-level aggregates only: no example ids or images")
    parser.add_argument("--bandwidth", type=float, default=0.1, help="KDE bandwidth of the ridge plots")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the trace")
    parser.add_argument(
        "--cladec", metavar="LAYER", default=None, help="show ClaDec and reference-autoencoder reconstructions of "
        "each query from this layer (trains both decoders on the training set first)",
    )  # fmt: skip
    parser.add_argument("--cladec-alpha", type=float, default=0.0, help="ClaDec's classification weight (default 0)")
    parser.add_argument("--cladec-epochs", type=int, default=30, help="decoder training epochs (default 30)")
    parser.add_argument(
        "--devices", default="1", help="devices sharing the pass over the trace (DDP; default 1, 'auto' for all)"
    )
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default)")
    parser.add_argument(
        "--storage-options", type=json.loads, default=None, metavar="JSON",
        help='fsspec options for a trace URL, e.g. \'{"endpoint_url": "http://minio:9000"}\' (default: from the '
        "environment, such as AWS_ENDPOINT_URL)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    try:
        doc = explain(
            args.ckpt,
            args.trace,
            args.queries,
            args.layers,
            args.top_k,
            args.out,
            args.score,
            args.privacy,
            args.bandwidth,
            args.num_workers,
            args.cladec,
            args.cladec_alpha,
            args.cladec_epochs,
            devices,
            args.accelerator,
            args.storage_options,
        )
    except TraceTrainError as exc:
        parser.exit(2, f"error: {exc}\n")
    if not doc:  # a rank other than 0 of a multi-device run
        return doc
    print(
        f"explained {len(doc['queries'])} queries with {doc['steps']} steps; wrote {args.out}/influence.json "
        f"and {args.out}/report.html"
    )
    return doc


if __name__ == "__main__":
    main()
