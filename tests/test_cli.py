import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_is_explained(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"svp {command} {action.option_strings}: no help text"


def test_svp_console_script_and_module_entry_points_agree():
    svp = Path(sys.executable).with_name("svp")
    top = subprocess.run([str(svp), "--help"], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert command in top
    module = subprocess.run([sys.executable, "-m", "jobs.precompute", "--help"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    assert "--refer-root" in module and "--store-sam-embeddings" in module
