"""Recipe files (``svp train --config``): the shipped ones, and a run's ``run_config.json`` as one."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
from train_helpers import train_flags

from jobs import entry, train
from jobs.demo import DemoOptions
from jobs.demo import train_config as demo_train_config
from jobs.options import RUN_RECORD
from jobs.workflow import SyntheticData

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _recorded(config: train.TrainConfig) -> dict:
    """``config`` as run_config.json writes it."""
    return json.loads(json.dumps(asdict(config), default=str))


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_each_shipped_recipe_parses_as_a_train_recipe(recipe):
    args = entry.parse(train, ["--config", str(recipe)])
    assert args.shards and args.run_dir and args.config == recipe


def test_the_shipped_recipes_are_the_demo_s_and_the_real_size_stack_s():
    assert {path.name for path in RECIPES} == {"demo.yaml", "realsize.yaml"}


def test_the_demo_recipe_is_what_svp_demo_trains():
    recipe = train.train_config(entry.parse(train, ["--config", str(REPO / "recipes" / "demo.yaml")]))
    defaults = DemoOptions()
    assert recipe == demo_train_config(defaults, SyntheticData.under(defaults.out))


def test_the_realsize_recipe_is_the_readme_s_train_example():
    lines = (REPO / "README.md").read_text().replace("\\\n", " ").splitlines()
    example = next(line for line in lines if line.startswith(".venv/bin/svp train --shards") and "--llm" in line)
    from_readme = vars(entry.parse(train, shlex.split(example)[2:]))
    from_recipe = vars(entry.parse(train, ["--config", str(REPO / "recipes" / "realsize.yaml")]))
    assert {**from_recipe, "config": None} == {**from_readme, "config": None}


def test_a_run_s_run_config_is_a_recipe_that_reproduces_the_run(shards, tiny_sam_checkpoint, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(train_flags(shards, first, tiny_sam_checkpoint, "--max-steps", "1", "--lora-r", "4",
                                  "--no-ssa", "--lr", "1e-3", "--seed", "5")) == 0
    recorded = json.loads((first / "run_config.json").read_text())
    # The config it resolves to is the one the run recorded, key for key ...
    config = train.resolve_shards(train.train_config(entry.parse(train, ["--config", str(first / "run_config.json")])))
    assert _recorded(config) == {key: value for key, value in recorded.items() if key not in (*RUN_RECORD, "command")}
    assert config.model.seed == config.seed == 5 and isinstance(config.shards, list)
    # ... and training from it, elsewhere, records the same run but for the directory.
    assert train.main(["--config", str(first / "run_config.json"), "--run-dir", str(second)]) == 0
    again = json.loads((second / "run_config.json").read_text())
    assert again["run_dir"] == str(second)
    assert {**again, "run_dir": None} == {**recorded, "run_dir": None}
