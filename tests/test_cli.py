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


# svp options a launcher's option starts with, on purpose. A command runs under `torchrun` and
# `accelerate launch` with its options after the launcher's (`torchrun ... -m jobs.eval --run-dir RUN`),
# and argparse reads every argument that looks like an abbreviation of one of its own options as that
# option, before it hands the rest to the script: `--run` stopped torchrun as "ambiguous option: --run
# could match --run-path, --run_path".
LAUNCHER_PREFIX_EXCEPTIONS = {
    "--help": "argparse's own, in every parser; an exact match after the script is the script's",
    "--mixed-precision": "svp train's is Accelerate's mixed precision, named as `accelerate launch` names it",
    "--config": "recipes (train, precompute, eval); a prefix of accelerate's --config_file only, and `accelerate "
                "launch` takes no abbreviations (allow_abbrev=False, checked below)",
}


def _long_options(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings if option.startswith("--")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_option_is_an_abbreviation_of_a_launcher_s_option(command):
    """Each command's parser as ``python -m jobs.NAME`` builds it (what torchrun and accelerate launch run)."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from jobs import entry
    from jobs.options import OptionsParser

    launchers = {"torchrun": get_args_parser(), "accelerate launch": launch_command_parser()}
    assert not launchers["accelerate launch"].allow_abbrev  # what the --config exception rests on
    parser = entry.configure(OptionsParser(prog=f"svp {command}"), COMMANDS[command][0])
    clashes = [f"svp {command} {option} is an abbreviation of {launcher}'s {theirs}"
               for option in sorted(_long_options(parser) - set(LAUNCHER_PREFIX_EXCEPTIONS))
               for launcher, launcher_parser in launchers.items()
               for theirs in sorted(_long_options(launcher_parser)) if theirs.startswith(option)]
    assert not clashes
