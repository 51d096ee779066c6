"""``python -m lightning_tracetrain.trace``: see :mod:`lightning_tracetrain.trace.cli`."""

from lightning_tracetrain.trace.cli import main

main()
