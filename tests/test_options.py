"""Every option is a config field, written once (jobs.options): the walk over every parser, and how
flags, recipes and defaults combine."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from dataclasses import replace
from pathlib import Path

import pytest

import bench
from bench.__main__ import PARTS
from bench.common import build_parser as bench_parser
from jobs import cli, entry, eval, precompute, tiny_sam, train
from jobs.cli import COMMANDS, build_parser
from jobs.options import OptionsParser, build, walk
from pipeline.sam_model import TOY_SAM_MODEL_TYPES
from pipeline.superpixels.base import SamOptions
from trainer.sam_pretraining import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


def _parsers() -> dict[str, OptionsParser]:
    parser = build_parser()
    return {"svp": parser, **parser._subparsers._group_actions[0].choices}


def _bench_parsers() -> dict[str, OptionsParser]:
    """The parser of every ``python -m bench...`` entry point, by its command: each module of the
    package with a ``main`` (a part's flags with the shared ones, as it runs alone: every module with
    ``PRESETS``, ``bench.ablation`` too, which ``python -m bench`` leaves out; any other module's
    ``build_parser()``), and all the parts together (``python -m bench``)."""
    parsers = {"python -m bench": bench_parser(PARTS, "python -m bench", "")}
    for info in pkgutil.iter_modules(bench.__path__):
        module = importlib.import_module(f"bench.{info.name}")
        if info.name != "__main__" and hasattr(module, "main"):
            name = f"python -m bench.{info.name}"
            parsers[name] = bench_parser([module], name, "") if hasattr(module, "PRESETS") else module.build_parser()
    return parsers


BENCH = sorted(_bench_parsers())


@pytest.mark.parametrize("command", [*(f"svp {name}" for name in sorted(COMMANDS)), *BENCH])
def test_every_field_is_exactly_one_flag_named_after_it_with_help(command):
    parser = {**{f"svp {name}": parser for name, parser in _parsers().items()}, **_bench_parsers()}[command]
    assert parser.configs, f"{command} takes no options from config dataclasses"
    actions = [action for action in parser._actions if action.dest != "help"]
    strings = [string for action in actions for string in action.option_strings]
    assert len(strings) == len(set(strings)), f"{command}: an option string is defined twice"
    options = [option for config in parser.configs for option in walk(config)]
    own = [option for option in options if not option.same_as]
    assert len({option.dest for option in own}) == len(own), f"{command}: two groups define the same option"
    for option in options:
        name = f"{command}: {option.owner.__name__}.{option.field.name}"
        assert option.field.metadata.get("help"), f"{name} has no help"
        # The one renaming: a nested config's kind is chosen by the name of the field that holds it.
        expected = option.path[-2] if option.field.name == "kind" and len(option.path) > 1 else option.field.name
        if option.same_as:
            assert option.dest in {other.dest for other in own}, f"{name} is the same as no option of the command"
            continue
        assert option.dest == expected, name
        setters = [action for action in actions if action.dest == option.dest]
        assert len(setters) == 1, f"{name} is set by {len(setters)} flags: {[a.option_strings for a in setters]}"
        [action] = setters
        flag = "--" + expected.replace("_", "-")
        if option.field.metadata.get("positional"):
            assert action.option_strings == [], name
        elif option.hint is bool:
            assert action.option_strings == [flag, "--no-" + flag[2:]], name
        else:
            assert action.option_strings == [flag], name
        assert action.help and "default N" not in action.help, name
    # Nothing else: every flag but --help and --config is a field's.
    assert {action.dest for action in actions} - {option.dest for option in own} <= {"config"}


def test_the_top_level_command_has_only_its_sub_commands():
    assert [action.dest for action in _parsers()["svp"]._actions] == ["help", "command"]


def test_the_shared_options_read_the_same_in_every_command_and_benchmark_that_takes_them():
    """The shared SAM and Ray options, and those a benchmark takes from a command (at a size of its
    own: bench.options.option_of), are written once: the same help wherever they are taken."""
    parsers = {**{name: parser for name, parser in _parsers().items() if name != "svp"}, **_bench_parsers()}
    parts = {"python -m bench", *(f"python -m bench.{part.NAME}" for part in PARTS)}
    sam_settings = {"precompute", "python -m bench", "python -m bench.precompute"}
    shared = {"--sam-checkpoint": {"train", "precompute", "predict", *parts},
              "--sam-model": {"train", "precompute", "predict", *parts},
              "--points-per-batch": sam_settings, "--images-per-batch": sam_settings,
              "--pred-iou-thresh": {"precompute", "python -m bench.large_image"},
              "--stability-score-thresh": {"precompute", "python -m bench.large_image"},
              "--length-group": {"train", "python -m bench", "python -m bench.train_step"},
              "--lr": {"train", "python -m bench", "python -m bench.accuracy"},
              "--batch-size": {"train", "python -m bench", "python -m bench.accuracy"},
              "--sam-precision": {"precompute", "predict"},
              "--address": {"train", "precompute", "predict"}, "--gpus-per-worker": {"train", "precompute", "predict"},
              "--results": {*parts, "python -m bench.realsize", "python -m bench.inference"},
              "--allow-busy": {*parts, "python -m bench.realsize", "python -m bench.inference"},
              "--dtype": {*parts, "python -m bench.inference"},
              "--points-per-side": {*sam_settings, "python -m bench.large_image", "python -m bench.inference"}}
    for flag, users in shared.items():
        helps = {name: action.help.split(" (default: ")[0] for name, parser in parsers.items()
                 for action in parser._actions if flag in action.option_strings}
        assert users <= set(helps), flag
        assert len({helps[name] for name in users}) == 1, f"{flag} is defined more than once: {helps}"
    sam_models = {name: tuple(action.choices) for name, parser in parsers.items() for action in parser._actions
                  if "--sam-model" in action.option_strings}
    assert sam_models.pop("tiny-sam") == TOY_SAM_MODEL_TYPES  # it builds the toy SAMs, no released one
    assert len(set(sam_models.values())) == 1


def test_help_shows_the_default_of_every_option_that_has_one(capsys):
    with pytest.raises(SystemExit):
        entry.parse(train, ["--help"])
    shown = capsys.readouterr().out
    for flag, default in (("--lora-targets", "q_proj,v_proj"), ("--lr", "0.0003"), ("--sspe", "--sspe"),
                          ("--resume", "--no-resume"), ("--projector", "svp"), ("--max-failures", "0")):
        entry_text = re.search(rf"\n  {flag}[ ,].*?(?=\n  -|\n\n)", shown, re.S).group(0)
        assert f"(default: {default})" in " ".join(entry_text.split()), flag
    assert "--shards SHARDS --run-dir RUN_DIR" in " ".join(shown.split())  # required in the usage


def test_flags_parse_into_the_configs_nested_ones_included():
    args = entry.parse(train, ["--shards", "a.tar::b.tar", "--run-dir", "run", "--projector", "pool", "--no-ssa",
                               "--lora-targets", "q_proj,k_proj", "--betas", "0.8,0.9", "--seed", "3"])
    config = train.train_config(args)
    assert config.model.projector.kind == "pool" and config.model.projector.ssa is False
    assert config.model.lora_targets == ("q_proj", "k_proj") and config.betas == (0.8, 0.9)
    assert config.seed == config.model.seed == 3  # one --seed: ModelConfig.seed is the same as TrainConfig.seed


@pytest.mark.parametrize("flags, message", [(["--betas", "0.9"], "--betas"), (["--lr", "fast"], "--lr"),
                                            (["--projector", "cnn"], "invalid choice: 'cnn'")])
def test_a_bad_flag_value_is_refused_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        entry.parse(train, ["--shards", "s.tar", "--run-dir", "run", *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_value_only_the_config_refuses_exits_2(tmp_path, capsys):
    assert train.main(["--shards", "s.tar", "--run-dir", str(tmp_path / "run"), "--pool-tokens", "0"]) == 2
    assert "pool_tokens must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--resume-from", "{tmp}/run/checkpoints/step_000001"], "--resume-from needs --resume: without it"),
    (["--resume", "--resume-from", "{tmp}/missing"], "--resume checkpoint {tmp}/missing does not exist: not a"),
    (["--resume", "--resume-from", "{tmp}/file"], "--resume checkpoint {tmp}/file is not a directory: not a"),
], ids=["without-resume", "missing", "a-file"])
def test_svp_train_refuses_a_resume_from_it_cannot_use_with_exit_2(tmp_path, capsys, flags, message):
    (tmp_path / "file").write_text("not a checkpoint")
    argv = ["train", "--shards", "s.tar", "--run-dir", str(tmp_path / "run"), *(f.format(tmp=tmp_path) for f in flags)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("svp train: error: " + message.format(tmp=tmp_path)) and error.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pretrain", [False, True], ids=["random", "pretrained"])
@pytest.mark.parametrize("out", ["missing/sam.pth", "file/sam.pth", "."], ids=["missing-dir", "under-a-file", "a-dir"])
def test_svp_tiny_sam_reports_an_out_it_cannot_write_as_an_error_with_exit_2(synth_root, tmp_path, capsys, out,
                                                                             pretrain):
    (tmp_path / "file").write_text("")
    out = tmp_path / out
    before = sorted(tmp_path.iterdir())
    argv = ["tiny-sam", "--out", str(out), *(["--pretrain-on", str(synth_root)] if pretrain else [])]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"svp tiny-sam: error: --out {out}") and error.count("\n") == 1, error
    assert sorted(tmp_path.iterdir()) == before


def test_svp_tiny_sam_reports_a_bad_refer_root_or_step_count_as_an_error_with_exit_2(tmp_path, capsys):
    out, missing = tmp_path / "sam.pth", tmp_path / "missing"
    assert cli.main(["tiny-sam", "--out", str(out), "--pretrain-on", str(missing)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"svp tiny-sam: error: --pretrain-on {missing}: ") and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its staging file
    for flag in ("--steps", "--images-per-step"):  # refused before the REFER root is read
        assert cli.main(["tiny-sam", "--out", str(out), "--pretrain-on", str(missing), flag, "0"]) == 2
        assert capsys.readouterr().err == f"svp tiny-sam: error: {flag} must be >= 1, got 0\n"
    assert list(tmp_path.iterdir()) == []


def test_svp_tiny_sam_pretrains_with_its_options_and_pretrain_configs_defaults_for_the_rest():
    args = entry.parse(tiny_sam, ["--out", "sam.pth", "--steps", "5", "--lr", "0.01", "--seed", "3"])
    assert build(tiny_sam.TinySamOptions, args).pretraining() == replace(PretrainConfig(), steps=5, lr=0.01, seed=3)
    assert build(tiny_sam.TinySamOptions, entry.parse(tiny_sam, ["--out", "sam.pth"])).pretraining() == PretrainConfig()


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_recipe_sets_options_by_name_or_nested_and_flags_override_it(tmp_path):
    recipe = _recipe(tmp_path, "shards: s.tar\nrun_dir: run\nmax-steps: 7\nlr: 1e-3\n"
                               "model: {lora_r: 4, projector: {kind: mlp}, lora_targets: [all-linear]}\n")
    config = train.train_config(entry.parse(train, ["--config", str(recipe)]))
    assert (config.shards, config.run_dir, config.max_steps, config.lr) == ("s.tar", Path("run"), 7, 1e-3)
    assert (config.model.lora_r, config.model.projector.kind, config.model.lora_targets) == (4, "mlp", ("all-linear",))
    config = train.train_config(entry.parse(train, ["--lora-r", "16", "--config", str(recipe), "--max-steps", "9",
                                                    "--run-dir", "other", "--projector", "svp"]))
    assert (config.model.lora_r, config.max_steps, config.run_dir, config.model.projector.kind) == (
        16, 9, Path("other"), "svp")
    assert config.lr == 1e-3  # what no flag overrides stays the recipe's


@pytest.mark.parametrize("text, message", [
    ("shards: s.tar\nrun_dir: run\nlora_rank: 4\n", "not an option of `svp train`: lora_rank"),
    ("shards: s.tar\nrun_dir: run\nmodel: {projector: {kinds: mlp}}\n", "model.projector.kinds"),
    ("command: eval\nshards: s.tar\nrun_dir: run\n", "another command than `svp train`"),
    ("shards: s.tar\nrun_dir: run\nmax_steps: many\n", "max_steps: 'many' is not of type int"),
    ("shards: s.tar\nrun_dir: run\nmixed_precision: fp8\n", "'fp8' is not one of no, bf16, fp16"),
    ("shards: s.tar\nrun_dir: run\nseed: 1\nmodel: {seed: 2}\n", "seed is given twice"),
    ("- shards\n", "no mapping"),
    ("shards: s.tar\n", "the following arguments are required: --run-dir"),
], ids=["unknown", "unknown-nested", "command", "type", "choice", "twice", "not-a-mapping", "required"])
def test_a_bad_recipe_is_refused_with_exit_2_naming_the_key(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit:
        entry.parse(train, ["--config", str(_recipe(tmp_path, text))])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_precompute_and_eval_take_recipes_too(tmp_path):
    recipe = _recipe(tmp_path, "refer_root: refer\ndataset: refcoco\nsplit_by: unc\nout: shards\n"
                               "backend: felzenszwalb\nmax_regions: 12\nstore_sam_embeddings: true\n"
                               "sam_checkpoint: sam.pth\nsam_model: tiny\n")
    spec = precompute.backend_spec(entry.parse(precompute, ["--config", str(recipe), "--min-area", "5"]))
    assert (spec.name, spec.partition.max_regions, spec.partition.min_area) == ("felzenszwalb", 12, 5)
    assert (spec.sam.sam_checkpoint, spec.sam.sam_model, spec.sam.store_sam_embeddings) == ("sam.pth", "tiny", True)
    recipe = _recipe(tmp_path, json.dumps({"run_dir": "run", "shards": "s", "splits": ["val", "testA"]}), "eval.json")
    given = build(eval.EvalOptions, entry.parse(eval, ["--config", str(recipe), "--batch-size", "2"]))
    assert (given.run_dir, given.splits, given.batch_size) == (Path("run"), ("val", "testA"), 2)


def test_train_precompute_and_eval_take_recipes_and_no_other_command_does():
    takes = {name for name, parser in _parsers().items() if "config" in {a.dest for a in parser._actions}}
    assert takes == {"train", "precompute", "eval"}


def test_sam_fields_named_after_their_flags_keep_the_names_shard_configs_record(tiny_sam_checkpoint):
    """Renaming ``model_type`` to ``sam_model`` (the flag's name) must not change a config hash, and
    svp predict reads records written before the rename."""
    options = SamOptions(str(tiny_sam_checkpoint), "tiny", points_per_side=8, images_per_batch=2,
                         store_sam_embeddings=True)
    record = options.record()
    assert set(record) == {"model_type", "points_per_side", "pred_iou_thresh", "stability_score_thresh",
                           "stability_score_offset", "box_nms_thresh", "store_embeddings", "checkpoint_sha256"}
    assert (record["model_type"], record["store_embeddings"], record["points_per_side"]) == ("tiny", True, 8)
    assert SamOptions.from_record(record) == replace(options, sam_checkpoint=None, images_per_batch=4)
