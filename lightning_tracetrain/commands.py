"""``python -m lightning_tracetrain COMMAND``: training through LightningCLI and the package's tools, one entry point.

``fit``/``validate``/``test``/``predict`` go to LightningCLI (a model, datamodule and
``TraceCallback`` from a config such as ``configs/digits.yaml``); the other commands
are listed by ``--help`` and each has its own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from lightning_tracetrain.console import hide_foreign_notices, one_line_errors, wants_debug
from lightning_tracetrain.lightning_cli import PROG, cli_main

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = {
    "explain": ("lightning_tracetrain.explain.cli", "explain test inputs by the training steps, examples and classes"),
    "trace": ("lightning_tracetrain.trace.cli", "verify (and repair) a trace, or print its summary (info)"),
    "demo": ("lightning_tracetrain.workloads.demo", "train a config with tracing, then explain test inputs"),
    "evaluate": ("lightning_tracetrain.workloads.evaluate", "our method beside the baselines on digits"),
    "specificity": ("lightning_tracetrain.workloads.specificity", "per layer: how class-specific is what it learned?"),
    "plan": ("lightning_tracetrain.workloads.plan", "project a config's trace size per storage mode; does it fit?"),
    "depth": ("lightning_tracetrain.workloads.depth", "the paper's depth diagnosis on motif graphs vs accuracy"),
}


def usage() -> str:
    configs = sorted(Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    lines = [
        f"usage: {PROG} COMMAND [OPTIONS]",
        "",
        "Training through LightningCLI, and the tools that explain what a traced run learned.",
        "",
        "training (LightningCLI: a model, a datamodule and a TraceCallback from a config):",
        *(f"  {c:<12} {c} with a config, e.g. {PROG} {c} --config configs/digits.yaml" for c in LIGHTNING_COMMANDS),
        *([f"  configs here: {', '.join(str(c) for c in configs)}"] if configs else []),
        "",
        "tools:",
        *(f"  {c:<12} {help}" for c, (_, help) in COMMANDS.items()),
        "",
        f"{PROG} COMMAND --help shows a command's options; --debug shows the traceback of a failure.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> object:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    command = argv[0]
    if command in COMMANDS:  # each tool handles --debug and its errors itself
        return importlib.import_module(COMMANDS[command][0]).main(argv[1:])
    if command in LIGHTNING_COMMANDS or command.startswith("-"):
        args, debug = wants_debug(argv)
        hide_foreign_notices()
        with one_line_errors(debug):
            return cli_main(args)
    print(f"{PROG}: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
