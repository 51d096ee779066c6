"""``python -m lightning_tracetrain.explain``: see :mod:`lightning_tracetrain.explain.cli`."""

from lightning_tracetrain.explain.cli import main

main()
