"""svp train / eval / predict / demo on tiny models, CPU: checkpoints, resume, DDP, errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from ports import free_port
from safetensors.torch import load_file, save_file
from train_helpers import (
    assert_checkpoints,
    assert_disjoint_keys,
    assert_restores_saved_state,
    export_tensors,
    train_flags,
)

from jobs.eval import main as svp_eval
from jobs.predict import main as svp_predict
from jobs.train import main as svp_train
from trainer.checkpoint import CheckpointError
from trainer.export import load_exported_model
from trainer.plots import PlotError, training_curves, training_series

REPO = Path(__file__).resolve().parents[1]


def test_a_run_records_its_full_config_and_exports_only_trained_parts(trained_run, shards):
    config = json.loads((trained_run / "run_config.json").read_text())
    assert config["model"]["projector"] == {"kind": "svp", "pool_tokens": 16, "sspe": True, "ssa": True,
                                            "ssa_layers": 1, "ssa_heads": 4, "shuffle_tokens": False}
    manifest = shards / "manifest.json"
    import hashlib

    assert config["data"]["train"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert config["data"]["train"]["config_hash"] == json.loads(manifest.read_text())["config_hash"]
    assert config["git_commit"] != "" and {"torch", "transformers", "peft", "accelerate"} <= set(config["libraries"])
    assert config["seed"] == 0 and config["max_steps"] == 3
    exported = export_tensors(trained_run / "export")
    model = load_exported_model(trained_run)
    trained = model.trainable_state_dict()
    assert {n for n in exported if not n.startswith("llm/")} == set(model.trainable_state_dict(include_llm=False))
    assert sum(name.startswith("llm/") for name in exported) == sum(name.startswith("llm.") for name in trained) > 0
    assert not any(name.startswith(("vision.", "mask_head.sam.image_encoder")) for name in exported)
    # the export is the last step's weights, whose checkpoint the run kept
    kept = load_file(str(trained_run / "checkpoints" / "step_000003" / "model.safetensors"))
    assert kept.keys() == trained.keys() and all(torch.equal(kept[name], trained[name]) for name in kept)
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_tensorboard_logs_the_training_metrics_at_every_log_step(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((trained_run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert {"loss", "train_batch_ciou", "visual_tokens", "samples_per_s", "data_wait_fraction"} <= set(logged)
    assert all(len(values) == 3 for values in logged.values())  # --log-every 1, 3 steps
    assert all(0 <= value <= 1 for value in logged["data_wait_fraction"] + logged["train_batch_ciou"])
    assert all(value > 0 for value in logged["samples_per_s"] + logged["visual_tokens"])
    # the curves drawn at the end of training are these very scalars
    assert training_series(trained_run) == {tag: ([1, 2, 3], values) for tag, values in logged.items()}
    with Image.open(trained_run / "training_curves.png") as curves:
        assert curves.format == "PNG" and curves.width >= 400 and curves.height >= 400


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(shards, tiny_sam_checkpoint, tmp_path,
                                                                          capsys):
    run_dir = tmp_path / "run"
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "2", "--save-every", "2")) == 0
    assert_restores_saved_state(run_dir, shards, tiny_sam_checkpoint, step=2)
    # A later save killed half-way (one file of step 4 written) is no checkpoint to resume from ...
    unfinished = run_dir / "checkpoints" / "step_000004.tmp"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"cut short")
    capsys.readouterr()
    # ... so the resumed run goes on from step 2, says so, and its own save of step 4 replaces the leftover.
    assert svp_train(train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "4", "--save-every", "2",
                                  "--resume")) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000002'} at step 2" in printed
    assert "ignored unfinished checkpoint saves: step_000004.tmp" in printed
    assert_checkpoints(run_dir, [2, 4], ranks=1)


@pytest.mark.parametrize("flags, key",
                         [(["--projector", "mlp"], "projector"), (["--llm-training", "full"], "llm_training")],
                         ids=["projector", "llm-training"])
def test_resume_refuses_a_checkpoint_of_another_model(trained_run, shards, tiny_sam_checkpoint, capsys, flags, key):
    status = svp_train(train_flags(shards, trained_run, tiny_sam_checkpoint, "--max-steps", "5", "--resume", *flags))
    assert status == 2
    assert key in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--llm", "/nonexistent/llm"], "--llm"),
        (["--vision", "/nonexistent/vision"], "--vision"),
        (["--train-split", "nosuchsplit"], "nosuchsplit"),
    ],
    ids=["llm", "vision", "split"],
)
def test_bad_training_options_name_the_option(shards, tiny_sam_checkpoint, tmp_path, capsys, flags, message):
    assert svp_train(train_flags(shards, tmp_path / "run", tiny_sam_checkpoint, "--max-steps", "1", *flags)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--address", "auto"], "--address"),
        (["--cpus-per-worker", "1"], "--cpus-per-worker"),
        (["--ray-workers", "0", "--gpus-per-worker", "0", "--cpus-per-worker", "2"],
         "--gpus-per-worker, --cpus-per-worker"),
    ],
    ids=["address", "cpus", "both-with-zero-workers"],
)
def test_ray_flags_without_ray_workers_are_refused_before_anything_is_built(tmp_path, capsys, flags, named):
    # Neither shards nor a SAM checkpoint exist: the refusal comes before either is looked at.
    assert svp_train(train_flags(tmp_path / "shards", tmp_path / "run", tmp_path / "sam.pth", *flags)) == 2
    assert f"without --ray-workers: {named}; they need --ray-workers N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_shards_and_sam_checkpoint_are_named(shards, tiny_sam_checkpoint, tmp_path, capsys):
    assert svp_train(train_flags(tmp_path / "nowhere", tmp_path / "run", tiny_sam_checkpoint)) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert svp_train(train_flags(shards / "train-999999.tar", tmp_path / "run", tiny_sam_checkpoint)) == 2
    assert "train-999999.tar" in capsys.readouterr().err
    assert svp_train(train_flags(shards, tmp_path / "run", tmp_path / "no-sam.pth")) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err


def test_eval_reports_refer_split_names_and_metrics(trained_run, shards, capsys):
    assert svp_eval(["--run-dir", str(trained_run), "--shards", str(shards)]) == 0
    printed = capsys.readouterr().out
    assert "refcoco (unc)" in printed and f"chart:  {trained_run / 'eval.png'}" in printed
    with Image.open(trained_run / "eval.png") as chart:
        assert chart.format == "PNG" and chart.width >= 400
    [report] = json.loads((trained_run / "eval.json").read_text())["runs"]
    assert report["run"] == str(trained_run) and list(report["splits"]) == ["val", "testA", "testB"]
    for split in report["splits"].values():
        assert 0 <= split["ciou"] <= 1 and 0 <= split["giou"] <= 1 and 0 < split["all_foreground_ciou"] < 1
        assert split["samples"] >= split["images"] >= 1 and split["tokens_max"] >= split["tokens_mean"] > 0
        assert split["referred_share"] is None or 0 <= split["referred_share"] <= 1
    assert svp_eval(["--run-dir", str(trained_run), "--shards", str(shards), "--splits", "test"]) == 2
    assert "'test'" in capsys.readouterr().err



def _paper_table(path: Path) -> list[list[str]]:
    import csv

    return list(csv.reader(path.read_text().splitlines()))


def test_eval_of_several_runs_is_one_table_a_row_per_run_as_the_papers_lay_it_out(trained_run, shards, tmp_path,
                                                                                 capsys):
    out = tmp_path / "table" / "eval.json"
    assert svp_eval(["--run-dirs", f"{trained_run},{trained_run / 'export'}", "--shards", str(shards),
                     "--out", str(out)]) == 0
    reports = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in reports] == [str(trained_run), str(trained_run / "export")]
    header, *rows = _paper_table(out.with_suffix(".csv"))
    assert header == ["run", "projector", "cIoU val", "cIoU testA", "cIoU testB", "gIoU val", "gIoU testA",
                      "gIoU testB", "tokens/image"]
    assert [row[:2] for row in rows] == [[str(trained_run), "svp"], [str(trained_run / "export"), "svp"]]
    for report, row in zip(reports, rows):
        splits = report["splits"]
        assert row[2:8] == [f"{100 * splits[s][k]:.1f}" for k in ("ciou", "giou") for s in ("val", "testA", "testB")]
    assert rows[0][2:] == rows[1][2:]  # the export holds the same trained weights as the run
    markdown = out.with_suffix(".md").read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(header) + " |" and len(markdown) == 2 + len(rows)
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "cIoU testA" in printed and f"report: {out}" in printed


def test_eval_takes_either_run_dir_or_run_dirs(trained_run, shards, capsys):
    for flags in ([], ["--run-dir", str(trained_run), "--run-dirs", str(trained_run)]):
        assert svp_eval([*flags, "--shards", str(shards)]) == 2
        assert "give either --run-dir RUN or --run-dirs RUN1,RUN2,... (not both)" in capsys.readouterr().err
    # as `python -m jobs.eval` (the module is then __main__), errors still name the command
    result = subprocess.run([sys.executable, "-m", "jobs.eval", "--shards", str(shards)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "svp eval: error: give either --run-dir" in result.stderr


def test_eval_under_torchrun_with_two_processes_reports_what_one_process_does(trained_run, shards, tmp_path):
    # the train split spans 5 shards, so each process reads some of them; --run-dir goes on torchrun's
    # command line as it is (no svp option is an abbreviation of one of torchrun's: test_cli.py)
    flags = ["--run-dir", str(trained_run), "--shards", str(shards), "--splits", "train,val", "--batch-size", "2"]
    one, two = tmp_path / "one" / "eval.json", tmp_path / "two" / "eval.json"
    # One process at the thread count torchrun gives each of its processes (OMP_NUM_THREADS=1): PyTorch's CPU
    # kernels round differently with the thread count, which can move a mask pixel at the threshold and a
    # cIoU in its 7th digit. What splitting the shards between processes must change is nothing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert svp_eval([*flags, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "jobs.eval",
                             *flags, "--out", str(two)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report: ") == 1  # one process reports for both
    [single], [double] = (json.loads(path.read_text())["runs"] for path in (one, two))
    assert single["splits"]["train"]["samples"] > 0
    for split in ("train", "val"):
        timing = ("samples_per_s",)
        assert {k: v for k, v in double["splits"][split].items() if k not in timing} == {
            k: v for k, v in single["splits"][split].items() if k not in timing}
    assert _paper_table(one.with_suffix(".csv"))[1][2:] == _paper_table(two.with_suffix(".csv"))[1][2:]


def test_validation_while_training_logs_each_split_and_keeps_the_best_checkpoint(shards, tiny_sam_checkpoint,
                                                                                  tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "4", "--save-every", "4",
                        "--eval-every", "2", "--eval-splits", "val,testA", "--eval-max-samples", "4")
    assert svp_train([*flags, "--export", "best"]) == 0
    series = training_series(run_dir)
    for split in ("val", "testA"):
        for metric in ("eval_ciou", "eval_giou"):
            steps, values = series[f"{metric}/{split}"]
            assert steps == [2, 4] and all(0 <= value <= 1 for value in values)
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    scores = {step: statistics.fmean(series[f"eval_ciou/{split}"][1][i] for split in ("val", "testA"))
              for i, step in enumerate((2, 4))}
    assert best["step"] == max(scores, key=lambda step: (scores[step], -step)) and best["metric"] == "ciou"
    assert best["score"] == pytest.approx(scores[best["step"]], rel=1e-6)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "best").iterdir()) == sorted(
        p.name for p in (checkpoints / "step_000004").iterdir())  # as complete as a step checkpoint
    exported = load_exported_model(run_dir).trainable_state_dict()
    kept = load_file(str(checkpoints / "best" / "model.safetensors"))
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    assert json.loads((run_dir / "export" / "config.json").read_text())["trained"]["step"] == best["step"]
    with Image.open(run_dir / "training_curves.png") as curves:
        assert curves.height == 4 * 260  # four panels of 2.6 in at 100 dpi: loss, train-batch cIoU, validation, lr

    assert svp_train([*train_flags(shards, tmp_path / "other", tiny_sam_checkpoint), "--export", "best"]) == 2
    assert "--export best needs --eval-every N" in capsys.readouterr().err

def test_eval_of_shards_with_only_a_train_split_is_refused_with_no_report(shards, tmp_path, capsys):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["samples_by_split"] = {"train": manifest["samples_by_split"]["train"]}
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] == "train"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"  # refused before the run is read: it need not exist
    assert svp_eval(["--run-dir", str(run_dir), "--shards", str(tmp_path)]) == 2
    assert "holds no split but train to evaluate; name one with --splits" in capsys.readouterr().err
    assert not run_dir.exists()


def test_training_curves_plot_the_logged_steps_and_a_resumed_run_s_later_values(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with pytest.raises(PlotError, match="no TensorBoard event files"):
        training_series(tmp_path)
    first = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in (1, 2, 3, 4):
        first.add_scalar("loss", 10.0 - step, step)
        first.add_scalar("lr", 1e-3 * step, step)
    first.add_scalar("train_batch_ciou", 0.25, 2)
    first.add_scalar("train_batch_ciou", 0.5, 4)
    first.close()
    resumed = SummaryWriter(str(tmp_path / "tensorboard"))  # a resume from step 2 logs steps 3 and 4 again
    for step in (3, 4, 5):
        resumed.add_scalar("loss", 0.5 * step, step)
    resumed.close()
    assert training_series(tmp_path) == {"loss": ([1, 2, 3, 4, 5], [9.0, 8.0, 1.5, 2.0, 2.5]),
                                         "lr": ([1, 2, 3, 4], [pytest.approx(1e-3 * s) for s in (1, 2, 3, 4)]),
                                         "train_batch_ciou": ([2, 4], [0.25, 0.5])}
    with Image.open(training_curves(tmp_path)) as curves:
        assert curves.format == "PNG" and curves.size == (700, 780)  # three panels of 7 x 2.6 inches at 100 dpi


@pytest.mark.parametrize("weights", ["svp.safetensors", "llm/adapter_model.safetensors"])
def test_an_export_with_missing_or_extra_keys_is_refused_with_the_list(trained_run, tmp_path, weights):
    export = tmp_path / "export"
    shutil.copytree(trained_run / "export", export)
    state = load_file(str(export / weights))
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["unexpected.weight"] = torch.zeros(1)
    save_file(state, str(export / weights))
    with pytest.raises(CheckpointError) as error:
        load_exported_model(export)
    assert dropped in str(error.value) and "unexpected.weight" in str(error.value)


def test_predict_writes_an_overlay_and_a_mask(trained_run, refer_root, tmp_path):
    image = sorted((refer_root / "images/mscoco/images/train2014").glob("*.jpg"))[0]
    width, height = Image.open(image).size
    status = svp_predict(["--run-dir", str(trained_run), "--image", str(image), "--text", "the red circle",
                          "--out", str(tmp_path / "overlay.png"), "--mask-out", str(tmp_path / "mask.png")])
    assert status == 0
    overlay, mask = Image.open(tmp_path / "overlay.png"), Image.open(tmp_path / "mask.png")
    assert mask.size == (width, height) and overlay.width == width and overlay.height > height


@pytest.mark.parametrize("text", ["", "   "], ids=["empty", "spaces"])
def test_predict_refuses_an_empty_expression(trained_run, refer_root, tmp_path, capsys, text):
    image = sorted((refer_root / "images/mscoco/images/train2014").glob("*.jpg"))[0]
    status = svp_predict(["--run-dir", str(trained_run), "--image", str(image), "--text", text,
                          "--out", str(tmp_path / "overlay.png")])
    assert status == 2 and "--text is empty" in capsys.readouterr().err
    assert not (tmp_path / "overlay.png").exists()


@pytest.mark.parametrize("flags", [[], ["--backend", "sam"]], ids=["run-backend", "sam-backend"])
def test_predict_refuses_a_sam_model_the_run_was_not_made_with(trained_run, refer_root, tiny_sam_checkpoint, tmp_path,
                                                               capsys, flags):
    """The run's shards were made with the tiny SAM (its embeddings): an explicit --sam-model vit_h is an
    error naming both, never silently replaced by the recorded one; --sam-model tiny agrees."""
    image = sorted((refer_root / "images/mscoco/images/train2014").glob("*.jpg"))[0]
    common = ["--run-dir", str(trained_run), "--image", str(image), "--text", "the red circle",
              "--sam-checkpoint", str(tiny_sam_checkpoint), *flags]
    assert svp_predict([*common, "--sam-model", "vit_h", "--out", str(tmp_path / "refused.png")]) == 2
    assert "--sam-model vit_h is not the SAM of the run" in capsys.readouterr().err
    assert not (tmp_path / "refused.png").exists()
    assert svp_predict([*common, "--sam-model", "tiny", "--out", str(tmp_path / "overlay.png")]) == 0


def readme_launches() -> dict[str, list[str]]:
    """README's ``torchrun`` and ``accelerate launch`` command lines, by launcher, split as a shell would."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(("torchrun ", "accelerate launch "))]
    return {shlex.split(line)[0]: shlex.split(line) for line in lines}


# README's lines are for two machines of 8 GPUs, HEAD the first one's address; on one machine, with two CPU
# processes, the same line gets one machine, two processes and a free port, and nothing else changes.
ONE_MACHINE = {"--nnodes": "1", "--nproc_per_node": "2", "--num_machines": "1", "--num_processes": "2"}


def on_one_machine(words: list[str], port: int) -> list[str]:
    after = ["", *words]  # each word's predecessor: the option it is the value of
    return [ONE_MACHINE.get(option, word.replace("HEAD", "127.0.0.1").replace("29500", str(port)))
            for option, word in zip(after, words, strict=False)]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_readme_launch_lines_run_two_processes_on_disjoint_samples(launcher, shards, tiny_sam_checkpoint, tmp_path):
    words = readme_launches()[launcher]
    assert words.count("...") == 2 and "jobs.train" in words, "README's line: launcher options, -m jobs.train, ..."
    command = on_one_machine(words, free_port())
    script = command.index("jobs.train") + 1  # what follows is svp's: the tiny run's flags for README's "..."
    launched = [str(Path(sys.executable).with_name(command[0])), *command[1:script]]
    run_dir = tmp_path / "run"
    named = {word for word in command[script:] if word.startswith("--")}
    assert named <= set(train_flags(shards, run_dir, tiny_sam_checkpoint)), "README names flags svp train has"
    result = subprocess.run([*launched, *train_flags(shards, run_dir, tiny_sam_checkpoint, "--max-steps", "2",
                                                     "--record-keys")],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_disjoint_keys(run_dir, ranks=2)
    assert_checkpoints(run_dir, [2], ranks=2)
    assert json.loads((run_dir / "run_config.json").read_text())["world_size"] == 2
    assert (run_dir / "export" / "svp.safetensors").is_file()


def test_demo_runs_end_to_end_and_reports(tmp_path, ray_local):
    from jobs.demo import main as demo

    assert demo(["--out", str(tmp_path), "--images", "12", "--sam-pretrain-steps", "2", "--steps", "2",
                 "--batch-size", "2", "--overlays", "2"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"projector", "ciou", "giou", "tokens_mean", "all_foreground_ciou", "tokens_mlp"} <= set(report)
    assert report["projector"] == "svp" and 0 < report["all_foreground_ciou"] < 1
    assert report["tokens_mean"] < report["tokens_mlp"] == 256
    assert 1 <= len(list((tmp_path / "overlays").glob("*.png"))) <= 2  # one per val image, at most --overlays
    assert Image.open(tmp_path / "tokens_histogram.png").size[0] > 0
