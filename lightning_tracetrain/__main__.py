"""``python -m lightning_tracetrain``: see :mod:`lightning_tracetrain.commands`."""

from lightning_tracetrain.commands import main

if __name__ == "__main__":
    main()
