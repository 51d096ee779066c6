"""``python -m lightning_tracetrain demo``: train a workload config with tracing, then explain test inputs.

``make demo`` runs it on ``configs/digits.yaml``: it trains, prints the trace's
summary, explains three test images (influence.json and report.html) and, for
single-class batches, the class specificity of every layer over the test set.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tracetrain.console import add_debug_flag, command, plain
from lightning_tracetrain.explain import ExplainArguments, explain
from lightning_tracetrain.lightning_cli import cli_main
from lightning_tracetrain.recording import TraceCallback
from lightning_tracetrain.trace import Trace
from lightning_tracetrain.workloads.specificity import class_specificity


@dataclass
class DemoResult:
    """What the demo produced: the trace, the explanation document and (single-class runs) class specificity."""

    trace: Trace
    checkpoint: str
    influence: dict[str, Any]
    specificity: dict[str, Any] | None
    text: str  # what the demo printed (the README shows it, and a test checks that it still does)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tracetrain demo", description=plain(__doc__.splitlines()[0])
    )
    parser.add_argument("--config", default="configs/digits.yaml", help="LightningCLI config (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    parser.add_argument("--queries", type=int, nargs="+", default=[0, 1, 2], help="test inputs to explain")
    return add_debug_flag(parser)


@command
def main(argv: list[str]) -> DemoResult:
    args = parser().parse_args(argv)

    overrides = ["--trace.overwrite", "true"]  # the demo replaces its own earlier trace, and says so here
    overrides += [] if args.epochs is None else ["--trainer.max_epochs", str(args.epochs)]
    with warnings.catch_warnings():  # the demo's own argv is not meant for LightningCLI
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = cli_main(["fit", "--config", args.config, *overrides])
    trainer = cli.trainer
    (result,) = trainer.test(cli.model, cli.datamodule, verbose=False)
    trace_dir = next(cb.dirpath for cb in trainer.callbacks if isinstance(cb, TraceCallback))
    ckpt = next(cb.last_model_path for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))

    trace = Trace(trace_dir)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    say(trace.summary())
    say(f"\ntest accuracy {result['test_acc']:.3f}; checkpoint {_shown(ckpt)}")

    out = Path(trainer.default_root_dir) / "explanations"
    doc = explain(ExplainArguments(ckpt=ckpt, trace=trace_dir, queries=args.queries, out=str(out)))
    # the layer to show: one whose examples get their exact shares (storage="factored"), else the last one
    shown = next((n for n in trace.layers if trace.spec.is_factored(n)), trace.layers[-1])
    for q in doc["queries"]:
        layer = q["layers"][shown]
        top = ", ".join(f"#{e['example']} (class {e['label']})" for e in layer["top_examples"][:3])
        say(
            f"query {q['query']}: label {q['label']}, predicted {q['predicted']}; {shown} learned it "
            f"mostly from {top}; class shares {_shares(layer['class_scores'])} ({layer['example_shares']})"
        )
    specificity = None
    if not (trace.steps.label >= 0).any():
        say(f"\nmixed batches: no step belongs to one class, so no class specificity; report: {out / 'report.html'}")
    else:
        specificity = class_specificity(ckpt, trace_dir)
        shares = ", ".join(f"{name} {s['mean']:.0%}" for name, s in specificity["layers"].items())
        say(
            f"\nshare of positive gamma from steps of the predicted class, over the test set "
            f"(chance {specificity['share_of_steps_of_the_predicted_class']:.0%}): {shares}"
        )
        say(f"\nreport: {out / 'report.html'}  (open it in a browser; data: {out / 'influence.json'})")
    return DemoResult(trace, ckpt, doc, specificity, "\n".join(lines))


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it is below it (as a user would type it)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _shares(class_scores: dict[str, float]) -> str:
    total = sum(v for v in class_scores.values() if v > 0) or 1.0
    return ", ".join(f"{c}: {v / total:.0%}" for c, v in list(class_scores.items())[:3])


if __name__ == "__main__":
    main()
