"""``python -m lightning_tracetrain.trace verify|info PATH``: check a trace, keep its intact part, describe it.

``verify`` reads every committed chunk (checking its checksum) and metadata
document, lists what is damaged, and exits 1 if anything is; with ``--repair``
it writes a copy cut back to the last intact step (``PATH.repaired``, or
``--out``; ``--in-place`` cuts the trace itself) and exits 0 once that copy
verifies clean. ``info`` prints the trace's summary.

Example:
    python -m lightning_tracetrain.trace verify runs/digits/trace --repair
"""

from __future__ import annotations

import argparse
import json

from lightning_tracetrain.console import add_debug_flag, command, plain
from lightning_tracetrain.trace.reader import Trace
from lightning_tracetrain.trace.verify import Verification, repair, verify


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_tracetrain.trace",
        description="Check a trace, keep its intact part, or describe it.",
        epilog=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{verify,info}")
    check = commands.add_parser("verify", help="check every chunk and metadata document; exit 1 on damage")
    check.add_argument("path", help="the trace (a folder or fsspec URL)")
    check.add_argument("--repair", action="store_true", help="keep a copy cut back to the last intact step")
    check.add_argument("--out", default=None, help="where the repaired copy goes (default: PATH.repaired)")
    check.add_argument("--in-place", action="store_true", help="with --repair: cut the trace itself, no copy")
    info = commands.add_parser("info", help="print the trace's summary: model, steps, bytes, layers")
    info.add_argument("path", help="the trace (a folder or fsspec URL)")
    for sub in (check, info):
        sub.add_argument("--storage-options", type=json.loads, default=None, metavar="JSON", help="fsspec options")
        add_debug_flag(sub)
    return parser


@command
def main(argv: list[str]) -> Verification | None:
    """Run a command; damage exits 1, a failure 2, each with one ``error:`` line."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "info":
        print(Trace(args.path, args.storage_options).summary())
        return None
    result = verify(args.path, args.storage_options)
    print(result.report())
    if result.ok:
        return result
    if not args.repair:
        cli.exit(1, "error: the trace is damaged; --repair keeps a copy cut back to its last intact step\n")
    fixed = repair(args.path, args.out, in_place=args.in_place, storage_options=args.storage_options)
    if not fixed.ok:
        cli.exit(1, f"error: the repaired trace at {fixed.path} still fails: {fixed.report()}\n")
    print(f"repaired: {fixed.path} holds the first {fixed.steps} steps, every chunk intact")
    return fixed
