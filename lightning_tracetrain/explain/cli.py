"""``python -m lightning_tracetrain.explain --ckpt CKPT --trace TRACE``: why did the model learn to compute this?

For each query (a test input) and each traced layer, attributes the layer's
representation of the query to the training steps, examples and classes that
built it, in one pass over the trace. Writes OUT/influence.json (every score;
schema in docs/influence-format.md) and OUT/report.html (one offline page:
contents, per query a summary, ridge plots and the most influential training
examples).

A query is an index into the test set: of the LightningDataModule the trace
recorded (its test_dataloader), or of --test-data MODULE:FUNCTION when the run
had none. The model is rebuilt from the class the trace recorded and the
checkpoint's weights.

Example:
    python -m lightning_tracetrain.explain --ckpt runs/digits/checkpoints/last.ckpt \\
        --trace runs/digits/trace --queries 0 1 2 --out runs/digits/explanations
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from lightning_tracetrain.baselines.cladec import fit_decoders
from lightning_tracetrain.batch import batch_field, is_graph_item
from lightning_tracetrain.console import add_debug_flag, command
from lightning_tracetrain.exceptions import TraceMismatchError, TraceTrainError
from lightning_tracetrain.explain.arguments import ExplainArguments, dataclass_parser, parse
from lightning_tracetrain.explain.document import Query, influence_document, merge_documents, picture
from lightning_tracetrain.explain.explainer import Explainer
from lightning_tracetrain.explain.graphs import graph_drawing
from lightning_tracetrain.explain.loading import load_datamodule, load_test_data
from lightning_tracetrain.explain.report import write_report
from lightning_tracetrain.trace import Trace


class QueryError(TraceTrainError, IndexError):
    """A query index outside the test set."""


def explain(args: ExplainArguments) -> dict[str, Any]:
    """Explain test inputs; writes ``influence.json`` and ``report.html`` to ``args.out`` and returns the JSON.

    With ``cladec`` (a layer name), ClaDec and its reference autoencoder are trained on the training
    set for that layer and each query is shown beside both reconstructions.

    With ``devices > 1`` the pass over the trace is sharded over the devices by Lightning's DDP
    (one process per device); only rank 0 writes the files, the other ranks return ``{}``.

    Queries are explained ``query_batch`` at a time (one pass over the trace each), so memory stays bounded
    for thousands of queries; only the first ``report_queries`` carry figures.
    """
    trace = Trace(args.trace, args.storage_options)
    explainer = Explainer.from_checkpoint(args.ckpt, trace, args.layers, trust=args.trust)
    datamodule = None if trace.datamodule is None and args.test_data else load_datamodule(trace, args.trust)
    test = load_test_data(args.test_data) if args.test_data else datamodule.test_dataloader()  # type: ignore[union-attr]
    for q in args.queries:
        if not 0 <= q < len(test.dataset):
            where = args.test_data or type(datamodule).__name__
            raise QueryError(
                f"Query {q} is out of range: the test set of {where} has {len(test.dataset)} examples "
                f"(0..{len(test.dataset) - 1})."
            )
    train_set = None if datamodule is None else datamodule.train_dataloader().dataset
    decoders = {}
    if args.cladec is not None and not args.privacy:
        if train_set is None:
            raise TraceMismatchError(
                "--cladec trains on the training set of the datamodule the trace recorded; it has none."
            )
        decoders = fit_decoders(explainer.model, args.cladec, train_set, (args.cladec_alpha,), args.cladec_epochs)
    docs = []
    for first in range(0, len(args.queries), args.query_batch):  # memory: one batch of queries at a time
        batch = args.queries[first : first + args.query_batch]
        items = {q: test.dataset[q] for q in batch}
        logits = explainer.set_queries([test.collate_fn([items[q]]) for q in batch])
        results = explainer.run(num_workers=args.num_workers, devices=args.device_count, accelerator=args.accelerator)
        if explainer.global_rank_ != 0:
            continue  # every rank holds the whole result; rank 0 writes it
        figures = max(0, args.report_queries - first)
        cladec = None
        if decoders:
            cladec = {
                "layer": args.cladec,
                "alpha": args.cladec_alpha,
                "epochs": args.cladec_epochs,
                "reconstructions": {q: _reconstructions(decoders, items[q]) for q in batch[:figures]},
            }
        docs.append(
            influence_document(
                trace,
                explainer.stop,
                results,
                logits,
                # pictures (a graph's layout takes milliseconds) only for the queries the report draws
                [Query(q, _label(items[q]), _picture(items[q]) if i < figures else None) for i, q in enumerate(batch)],
                checkpoint=args.ckpt,
                score=args.score,
                top_k=args.top_k,
                privacy=args.privacy,
                bandwidth=args.bandwidth,
                train_images=None if train_set is None else (lambda i: _picture(train_set[i])),
                cladec=cladec,
                figures=figures,
            )
        )
        del results  # the next batch's pass starts from nothing
    if explainer.global_rank_ != 0:
        return {}
    doc = merge_documents(docs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "influence.json").write_text(json.dumps(doc, indent=1))
    write_report(out / "report.html", doc)
    return doc


def _reconstructions(decoders: dict[str, Any], item: Any) -> dict[str, Any]:
    return {name: picture(d.reconstruct(batch_field(item, "x")[None])[0]) for name, d in decoders.items()}


def _picture(item: Any) -> Any:
    """An example's input as an image when it is one, or as a graph drawing when it is a graph."""
    return graph_drawing(item) if is_graph_item(item) else picture(batch_field(item, "x"))


def _label(item: Any) -> int:
    y = batch_field(item, "y")
    return int(torch.as_tensor(y).reshape(-1)[0]) if y is not None else -1


def parser() -> argparse.ArgumentParser:
    """The options of :class:`ExplainArguments`; the help ends with what the command writes and an example."""
    return add_debug_flag(dataclass_parser(ExplainArguments, "python -m lightning_tracetrain.explain", __doc__ or ""))


@command
def main(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv``, explain, print where the files went; a failure ends in one ``error:`` line (exit 2)."""
    args = parse(ExplainArguments, parser(), argv)
    doc = explain(args)
    if not doc:  # a rank other than 0 of a multi-device run
        return doc
    print(
        f"explained {len(doc['queries'])} queries with {doc['steps']} steps; wrote {args.out}/influence.json "
        f"and {args.out}/report.html"
    )
    return doc
