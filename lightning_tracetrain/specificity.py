"""``python -m lightning_tracetrain.specificity``: are later layers more class-specific? (the paper's observation)

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

from lightning_tracetrain.explain import load_datamodule
from lightning_tracetrain.explainer import Explainer


def predicted_class_share(gamma: torch.Tensor, step_labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Per query: sum of positive gamma over steps of the predicted class / sum of all positive gamma."""
    positive = gamma.clamp_min(0).double()
    own = positive * (step_labels[None, :] == predicted[:, None])
    return own.sum(1) / positive.sum(1).clamp_min(1e-300)


def class_specificity(ckpt: str | Path, trace: str | Path, queries: Sequence[int] | None = None) -> dict[str, Any]:
    """Mean predicted-class share of positive gamma per layer over the test set (or the given queries)."""
    explainer = Explainer.from_checkpoint(ckpt, trace, norms=False)
    datamodule = load_datamodule(explainer.trace)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tracetrain.specificity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--trace", required=True)
    parser.add_argument("--queries", type=int, nargs="+", default=None, help="test indices (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    result = class_specificity(args.ckpt, args.trace, args.queries)
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
