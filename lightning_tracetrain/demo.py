"""``python -m lightning_tracetrain.demo``: train the digits CNN on single-class batches with tracing, then explain."""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl

from lightning_tracetrain import Trace, TraceCallback
from lightning_tracetrain.data import DigitsDataModule
from lightning_tracetrain.explain import explain
from lightning_tracetrain.models import DigitsCNN


def main(argv: list[str] | None = None) -> Trace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="test images to explain")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    # the paper's protocol: single-class batches with ghost samples and ghost batch norm, so that every
    # step belongs to one class; the learning rate decays to zero so no class of the last steps dominates
    datamodule = DigitsDataModule(batch_size=32, seed=args.seed, single_class=True, ghost_size=10)
    model = DigitsCNN(lr=0.05, momentum=0.9, ghost_batch_norm=True, schedule="cosine")
    trace_dir = args.out / "trace"
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[TraceCallback(trace_dir, overwrite=True)],
        default_root_dir=args.out,
        logger=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule)
    (result,) = trainer.test(model, datamodule, verbose=False)
    trainer.save_checkpoint(args.out / "model.ckpt")

    trace = Trace(trace_dir)
    print(trace.summary())
    print(f"\ntest accuracy {result['test_acc']:.3f}; checkpoint {args.out / 'model.ckpt'}")

    out = args.out / "explanations"
    doc = explain(args.out / "model.ckpt", trace_dir, queries=args.queries, out=out)
    for q in doc["queries"]:
        last = q["layers"][trace.layers[-1]]
        top = ", ".join(f"#{e['example']} (class {e['label']})" for e in last["top_examples"][:3])
        print(
            f"query {q['query']}: label {q['label']}, predicted {q['predicted']}; {trace.layers[-1]} learned it "
            f"mostly from {top}; class shares {_shares(last['class_scores'])}"
        )
    print(f"\nreport: {out / 'report.html'}  (open it in a browser; data: {out / 'influence.json'})")
    return trace


def _shares(class_scores: dict[str, float]) -> str:
    total = sum(v for v in class_scores.values() if v > 0) or 1.0
    return ", ".join(f"{c}: {v / total:.0%}" for c, v in list(class_scores.items())[:3])


if __name__ == "__main__":
    main()
