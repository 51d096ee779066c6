"""The README's examples work: its Python examples run, in order, and every command it shows parses.

A command is checked against the parser of the tool it calls (LightningCLI with ``--print_config``, which
resolves the config and every class path it names); the commands that train or explain for real on digits
are also run by test_configs.py, test_explain_cli.py and ``make demo``. A Python example preceded by
``<!-- not run: REASON -->`` (it needs an S3 bucket) is only compiled.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(<!-- not run: [^>]+-->\n)?```(\w*)\n(.*?)\n```", re.S)


def _python_examples() -> list[tuple[str, bool]]:
    """``(code, run)`` of every Python example, in README order."""
    return [(code, not skip) for skip, lang, code in FENCE.findall(README) if lang == "python"]


def _commands() -> list[str]:
    """Every command the README shows: lines of shell examples and inline ``python ...`` code."""
    found = []
    for _, lang, code in FENCE.findall(README):
        if lang == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words and words[0] in ("python", "make"):
                    found.append(shlex.join(words))
    for span in re.findall(r"`(python (?:-m lightning_tracetrain|benchmarks/)[^`]*)`", README):
        found.append(shlex.join(shlex.split(span)))
    return list(dict.fromkeys(found))


@pytest.mark.slow
def test_the_readme_shows_what_make_demo_prints(tmp_path, monkeypatch):
    """The README's demo output is the demo's own output (run here as ``make demo`` runs it): it cannot drift."""
    from lightning_tracetrain.workloads import demo

    shown = re.search(r"prints \(training log omitted\):\n\n```\n(.*?)\n```", README, re.S)
    assert shown is not None, "the README's Quickstart shows what `make demo` prints"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    printed = demo.main(["--config", "configs/digits.yaml"]).text.strip()
    assert shown.group(1) == printed, f"The README's demo output has drifted; `make demo` now prints:\n{printed}"


def test_the_python_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    examples = _python_examples()
    assert sum(run for _, run in examples) >= 3
    for i, (code, run) in enumerate(examples):
        compiled = compile(code, f"README.md python example {i + 1}", "exec")
        if run:
            exec(compiled, namespace)
    assert namespace["trace"].num_steps == 20 and namespace["loss"].requires_grad


@pytest.mark.parametrize("command", _commands())
def test_every_command_parses(command, capsys):
    words = shlex.split(command)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), command
        return
    if words[1] == "-m":
        module, args = words[2], words[3:]
        if module in ("lightning_tracetrain.explain", "lightning_tracetrain.trace"):  # python -m PACKAGE.COMMAND
            module, args = "lightning_tracetrain", [module.rsplit(".", 1)[1], *args]
        assert module == "lightning_tracetrain", command
        _parse_tool(args)
    else:
        script = ROOT / words[1]
        spec = importlib.util.spec_from_file_location(script.stem, script)
        benchmark = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(benchmark)
        benchmark.parser().parse_args(words[2:])


def _parse_tool(args: list[str]) -> None:
    from lightning_tracetrain.commands import COMMANDS, LIGHTNING_COMMANDS
    from lightning_tracetrain.explain.arguments import ExplainArguments, parse
    from lightning_tracetrain.lightning_cli import cli_main

    name, rest = args[0], args[1:]
    if name == "--help":
        from lightning_tracetrain.commands import main

        main(["--help"])
        return
    if name in LIGHTNING_COMMANDS:
        with pytest.raises(SystemExit) as done:  # prints the resolved config and stops before training
            cli_main([name, *rest, "--print_config"])
        assert done.value.code in (0, None)
    elif name == "explain":
        from lightning_tracetrain.explain.cli import parser

        parse(ExplainArguments, parser(), rest)  # parsed and validated
    else:
        assert name in COMMANDS, name
        importlib.import_module(COMMANDS[name][0]).parser().parse_args(rest)
