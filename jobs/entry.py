"""The one way a job module becomes a command: ``svp <name>`` and ``python -m jobs.<name>`` alike."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType


def configure(parser: argparse.ArgumentParser, module: ModuleType) -> argparse.ArgumentParser:
    """Give ``parser`` the module's options and its docstring as the description."""
    parser.description = module.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    module.add_arguments(parser)
    parser.set_defaults(_command=module.run)
    return parser


def main(module_name: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<name>``: parse ``argv`` with the module's options and run it."""
    module = sys.modules[module_name]
    command = module_name.rsplit(".", 1)[-1].replace("_", "-")
    args = configure(argparse.ArgumentParser(prog=f"svp {command}"), module).parse_args(argv)
    return args._command(args)
