"""``explain``'s options as one dataclass: validated in one place, and the source of its argparse parser.

Each field carries its help text; :func:`dataclass_parser` turns the fields into
``--kebab-case`` options, so the CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_tracetrain.console import plain
from lightning_tracetrain.explain.loading import Trust


def option(help: str, default: Any = dataclasses.MISSING, **argparse_kwargs: Any) -> Any:
    """A dataclass field with its CLI help (and extra ``argparse`` settings such as ``metavar``)."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ExplainArguments:
    """Explain test inputs by the training steps, examples and classes that built each layer's representation.

    The same from Python: ``explain(ExplainArguments(ckpt=..., trace=...))``.
    """

    ckpt: str = option("Lightning checkpoint of the traced run (a path or fsspec URL)", metavar="CKPT")
    trace: str = option("the trace directory (or fsspec URL) the run wrote", metavar="TRACE")
    queries: list[int] = option(
        "the test inputs to explain, as indices into the test set (of the datamodule the trace recorded, or of "
        "--test-data)",
        [0, 1, 2],
        metavar="I",
    )
    test_data: str | None = option(
        "where the queries come from when the run had no LightningDataModule (or to explain other inputs): a "
        "function without arguments that returns the test Dataset, DataLoader or LightningDataModule; its package "
        "is imported and trusted like --trust-module, so name only your own code",
        None,
        metavar="MODULE:FUNCTION",
    )
    layers: list[str] | None = option("layers to explain (default: every traced layer)", None, metavar="LAYER")
    top_k: int = option("training examples listed per query and layer, best first", 5, metavar="K")
    out: str = option("folder for influence.json and report.html", "explanations", metavar="DIR")
    score: Literal["gamma", "cosine"] = option(
        "rank examples by their summed gamma (Algorithm 1) or by their summed cosine", "gamma"
    )
    privacy: bool = option("class-level aggregates only: no example ids, no images", False)
    query_batch: int = option(
        "queries explained per pass over the trace: memory grows with it (each query keeps a gradient the size of "
        "the traced parameters), and the trace is read once per batch",
        512,
        metavar="N",
    )
    report_queries: int = option(
        "queries drawn in report.html (ridge plots, images); every query is in influence.json and in the report's "
        "summary table",
        20,
        metavar="N",
    )
    bandwidth: float = option("KDE bandwidth of the ridge plots (cosines live in [-1, 1])", 0.1, metavar="H")
    num_workers: int = option("DataLoader worker processes reading the trace (0: a reading thread)", 0, metavar="N")
    cladec: str | None = option(
        "also show ClaDec and reference-autoencoder reconstructions of each query from this layer "
        "(trains both decoders on the training set first)",
        None,
        metavar="LAYER",
    )
    cladec_alpha: float = option("ClaDec's classification weight in [0, 1]", 0.0, metavar="A")
    cladec_epochs: int = option("decoder training epochs", 30, metavar="N")
    devices: str = option("devices sharing the pass over the trace (DDP), or 'auto' for all", "1", metavar="N")
    accelerator: str = option("where the pass runs: cpu, gpu or auto", "auto", metavar="KIND")
    storage_options: dict[str, Any] | None = option(
        'fsspec options of a trace URL as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\' '
        "(default: from the environment, such as AWS_ENDPOINT_URL)",
        None,
        metavar="JSON",
    )
    trust_module: list[str] = option(
        "import the model and datamodule classes the trace names from modules under this prefix "
        "(repeatable; this package's own are always allowed)",
        [],
        metavar="PREFIX",
        action="append",
    )
    trust_trace: bool = option(
        "trust the trace and checkpoint fully: import any class they name and unpickle the checkpoint "
        "without restriction (only for files you made yourself)",
        False,
    )

    def __post_init__(self) -> None:
        problems = []
        if self.top_k < 0:
            problems.append(f"--top-k must be 0 or more, got {self.top_k}")
        if not self.bandwidth > 0:
            problems.append(f"--bandwidth must be positive, got {self.bandwidth}")
        if self.query_batch < 1:
            problems.append(f"--query-batch must be at least 1, got {self.query_batch}")
        if self.report_queries < 0:
            problems.append(f"--report-queries must be 0 or more, got {self.report_queries}")
        if not self.queries:
            problems.append("--queries needs at least one test-set index")
        if self.num_workers < 0:
            problems.append(f"--num-workers must be 0 or more, got {self.num_workers}")
        if not 0.0 <= self.cladec_alpha <= 1.0:
            problems.append(f"--cladec-alpha must be in [0, 1], got {self.cladec_alpha}")
        if self.cladec_epochs < 1:
            problems.append(f"--cladec-epochs must be at least 1, got {self.cladec_epochs}")
        if self.score not in ("gamma", "cosine"):
            problems.append(f"--score must be 'gamma' or 'cosine', got {self.score!r}")
        if self.test_data is not None and self.test_data.count(":") != 1:
            problems.append(f"--test-data must be MODULE:FUNCTION, e.g. mypkg.data:test_set, got {self.test_data!r}")
        if not (str(self.devices).isdigit() and int(self.devices) >= 1) and self.devices != "auto":
            problems.append(f"--devices must be a number of devices or 'auto', got {self.devices!r}")
        elif self.cladec is not None and str(self.devices) != "1":
            problems.append("--cladec trains decoders on one device: explain with --devices 1 to show them")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def device_count(self) -> int | str:
        return int(self.devices) if str(self.devices).isdigit() else self.devices

    @property
    def trust(self) -> Trust:
        """The modules named by --trust-module, and the package of --test-data (naming it is trusting it)."""
        named = () if self.test_data is None else (self.test_data.partition(":")[0].split(".")[0],)
        return Trust((*self.trust_module, *named), self.trust_trace)


def dataclass_parser(cls: type, prog: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--kebab-case`` option per field of the dataclass ``cls``.

    Types map to argparse: ``bool`` is a flag, ``list[X]`` takes several values, ``Literal`` gives choices,
    ``dict`` parses JSON; a field without a default is required.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=plain((cls.__doc__ or "").strip().splitlines()[0]),
        epilog=plain(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs = {k: v for k, v in f.metadata.items()}
        flag = "--" + f.name.replace("_", "-")
        kind = _strip_none(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kwargs.setdefault("default", default)
            if kwargs["help"] and default is not None and default is not False and default != []:
                kwargs["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        origin = typing.get_origin(kind)
        if origin is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif origin is list:
            kwargs["type"] = typing.get_args(kind)[0]
            if kwargs.get("action") != "append":
                kwargs["nargs"] = "+"
            else:
                kwargs["default"] = None  # argparse appends to the default list otherwise
        elif origin is dict:
            kwargs["type"] = json.loads
        else:
            kwargs["type"] = kind
            kwargs.setdefault("metavar", {int: "N", float: "X"}.get(kind))
        parser.add_argument(flag, required=required, **kwargs)
    return parser


def parse(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """Parse ``argv`` into ``cls``; invalid values end in one ``error:`` line from the parser."""
    values = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):  # an "append" option that was never given
        if values[f.name] is None and f.metadata.get("action") == "append":
            values[f.name] = f.default_factory()  # type: ignore[misc]
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def _strip_none(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind
