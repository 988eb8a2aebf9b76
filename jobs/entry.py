"""The one way a job module becomes a command: ``svp <name>`` and ``python -m jobs.<name>`` alike.

A job module declares ``OPTIONS`` (its config dataclasses, whose fields are its options: see
:mod:`jobs.options`), ``RECIPES = True`` if it reads recipe files (``--config``), and ``run(args)``,
which raises :class:`~pipeline.errors.SvpError` for whatever its user has to fix: :func:`run` turns
that into one line on stderr and exit status 2, the same for every command.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from jobs.options import OptionsParser
from pipeline.errors import SvpError


def command_name(module: ModuleType) -> str:
    """``jobs.tiny_sam`` → ``tiny-sam`` (also when it runs as ``python -m jobs.tiny_sam``, named ``__main__``)."""
    name = module.__spec__.name if module.__name__ == "__main__" and module.__spec__ else module.__name__
    return name.rsplit(".", 1)[-1].replace("_", "-")


def configure(parser: OptionsParser, module: ModuleType) -> OptionsParser:
    """Give ``parser`` the module's options and its docstring as the description."""
    parser.description = module.__doc__
    parser.add_options(*module.OPTIONS, recipes_for=command_name(module) if getattr(module, "RECIPES", False) else None)
    parser.set_defaults(_command=module.run, _name=command_name(module))
    return parser


def parse(module: ModuleType, argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed as the options of the job ``module`` (exits 2 with usage on a bad one)."""
    return configure(OptionsParser(prog=f"svp {command_name(module)}"), module).parse_args(argv)


def main(module_name: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<name>``: parse ``argv`` with the module's options and run it."""
    return run(parse(sys.modules[module_name], argv))


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; an :class:`SvpError` is reported as ``svp NAME: error: MESSAGE``, exit 2."""
    try:
        return args._command(args)
    except SvpError as exc:
        print(f"svp {args._name}: error: {exc}", file=sys.stderr)
        return 2
