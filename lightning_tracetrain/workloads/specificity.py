"""``python -m lightning_tracetrain specificity``: are later layers more class-specific? (the paper's observation)

For every test input and traced layer: the share of positive gamma that comes
from steps of the class the model predicts. Single-class batches make each
step belong to one class (``trace.steps.label``). One pass over the trace, all
test inputs at once, gamma only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_tracetrain.console import add_debug_flag, command, plain
from lightning_tracetrain.explain import Explainer, Trust, load_datamodule
from lightning_tracetrain.functional import predicted_class_share


def class_specificity(
    ckpt: str | Path, trace: str | Path, queries: Sequence[int] | None = None, trust: Trust = Trust()
) -> dict[str, Any]:
    """Mean predicted-class share of positive gamma per layer over the test set (or the given queries)."""
    explainer = Explainer.from_checkpoint(ckpt, trace, norms=False, trust=trust)
    datamodule = load_datamodule(explainer.trace, trust)
    test = datamodule.test_dataloader()
    queries = list(range(len(test.dataset))) if queries is None else list(queries)
    logits = explainer.set_queries([test.collate_fn([test.dataset[q]]) for q in queries])
    results = explainer.run()
    predicted = logits.argmax(-1).cpu()
    labels = torch.from_numpy(explainer.trace.steps.label[: explainer.stop])
    chance = float(np.mean([np.mean(explainer.trace.steps.label[: explainer.stop] == int(p)) for p in predicted]))
    shares = {name: predicted_class_share(a.gamma, labels, predicted) for name, a in results.items()}
    return {
        "queries": len(queries),
        "steps": explainer.stop,
        "share_of_steps_of_the_predicted_class": chance,
        "layers": {name: {"mean": float(s.mean()), "std": float(s.std())} for name, s in shares.items()},
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tracetrain specificity", description=plain(__doc__.splitlines()[0])
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of the traced run")
    parser.add_argument("--trace", required=True, help="the trace the run wrote (with single-class steps)")
    parser.add_argument("--queries", type=int, nargs="+", default=None, help="test indices (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    parser.add_argument(
        "--trust-module", action="append", default=[], metavar="PREFIX", help="as explain's --trust-module"
    )
    return add_debug_flag(parser)


@command
def main(argv: list[str]) -> dict[str, Any]:
    args = parser().parse_args(argv)
    result = class_specificity(args.ckpt, args.trace, args.queries, Trust(tuple(args.trust_module)))
    print(
        f"{result['queries']} test inputs, {result['steps']} steps; steps of the predicted class: "
        f"{result['share_of_steps_of_the_predicted_class']:.1%}"
    )
    print("layer                      share of positive gamma from steps of the predicted class")
    for name, s in result["layers"].items():
        print(f"{name:<26} {s['mean']:.1%} (std {s['std']:.1%})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
