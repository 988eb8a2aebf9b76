"""``make bench`` plumbing: every part at toy sizes (``--preset quick``) and the headline figures
in ``latest.json``; the code paths of ``make bench-gpu`` (bf16 autocast, an LLM built from a config
and stored in bf16, the gpu preset's sizes) on the CPU at toy sizes."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from bench import accuracy, precompute, train_step
from bench.__main__ import PARTS, shared_cpu_note
from bench.__main__ import main as bench
from bench.common import LlmSize, differences_from_full, parse_args
from pipeline.superpixels.base import SamOptions
from trainer.model import SegmentationMLLM

HEADLINE = ("tokens_ratio_svp_to_mlp", "ciou_svp", "ciou_mlp", "ciou_pool", "train_step_ratio_svp_to_mlp",
            "infer_latency_ratio_svp_to_mlp", "precompute_speedup_vs_reference", "partition_agreement",
            "workers2_speedup", "sam_embedding_step_ratio")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, ray_local) -> tuple[Path, dict]:
    """``python -m bench --quick`` (what ``make bench`` runs, at toy sizes): (results dir, its return)."""
    results = tmp_path_factory.mktemp("bench")
    return results, bench(["--quick", "--allow-busy", "--results", str(results), "--work", str(results / "work")])


def test_quick_bench_writes_every_figure_with_a_sane_value(quick) -> None:
    results, returned = quick
    latest = json.loads((results / "latest.json").read_text())
    assert latest == json.loads(json.dumps(returned))
    assert set(HEADLINE) <= set(latest) and latest["device"].startswith("cpu")
    assert all(isinstance(latest[key], float) and math.isfinite(latest[key]) for key in HEADLINE)
    assert 0 < latest["tokens_ratio_svp_to_mlp"] < 1  # svp: tens of superpixels, mlp: 256 patches
    assert all(0 <= latest[f"ciou_{kind}"] <= 1 for kind in ("svp", "mlp", "pool"))
    assert latest["partition_agreement"] >= 0.95  # ≤1024 px: the same partition as the reference
    # Timings: positive and finite (above); how large depends on the machine and on what else runs on it.
    timings = ("train_step_ratio_svp_to_mlp", "infer_latency_ratio_svp_to_mlp", "precompute_speedup_vs_reference",
               "workers2_speedup", "sam_embedding_step_ratio", "length_grouped_pass_ratio",
               "loader_to_step_samples_ratio")
    assert all(latest[key] > 0 for key in timings)

    parts = latest["parts"]
    assert {name: json.loads((results / f"{name}.json").read_text()) for name in parts} == parts
    tokens = parts["tokens"]["projectors"]
    assert tokens["mlp"]["max"] == tokens["mlp"]["mean"] == 256
    assert tokens["pool"]["mean"] == parts["accuracy"]["pool_tokens"] == round(tokens["svp"]["mean"])
    assert tokens["svp"]["median"] <= tokens["svp"]["max"] and tokens["svp"]["p95"] <= tokens["svp"]["max"]
    assert Image.open(parts["tokens"]["histogram"]).size[0] > 0
    assert list(parts["train_step"]["sizes"]) == ["tiny", "64x2"]
    for size in parts["train_step"]["sizes"].values():  # the step timed with the prompt's opening shared and not
        sharing = size["svp_prefix_sharing"]
        assert sharing["shared_positions"] > 1 and sharing["step_shared_s"] > 0 and sharing["step_whole_s"] > 0
        assert sharing["positions_saved"] == (parts["train_step"]["batch_size"] - 1) * sharing["shared_positions"]
        pays = sharing["positions_saved"] >= SegmentationMLLM.min_shared_positions
        assert sharing["default"] == ("shared" if pays else "whole")
    passes = parts["train_step"]["sizes"]["64x2"]["svp_training"]["passes"]
    assert passes["arrival_order"]["batches"] == passes["length_grouped"]["batches"] > 0
    # The same items either way, and sorted neighbours give the least padding.
    assert 0 <= passes["length_grouped"]["padding_fraction"] <= passes["arrival_order"]["padding_fraction"] < 1
    embedding_step = parts["train_step"]["embedding_steps"]["tiny"]  # (the cpu preset's is vit_b)
    assert latest["sam_embedding_step_ratio_tiny"] == embedding_step["ratio"] and embedding_step["batch_size"] == 1
    # Only tiny SAMs were timed here, so the headline is tiny's (the bench's own step, at its batch).
    assert parts["train_step"]["sam_embedding_step_ratio_sam"] == "tiny"
    assert latest["sam_embedding_step_ratio"] == train_step.embedding_step_ratio(parts["train_step"]["sizes"]["tiny"])
    precompute = parts["precompute"]  # no --sam-checkpoint: a tiny SAM pretrained on the bench's images first
    assert precompute["sam_weights"] == "pretrained here for 2 steps" and precompute["sam"]["pred_iou_thresh"] == 0.5
    assert precompute["workers"]["images"] == 2
    for job in precompute["workers"]["jobs"].values():  # the busiest worker's stages: part of the job's wall time
        assert 0 < job["busiest_worker_s"] < job["seconds"]
        assert job["fixed_s"] == job["seconds"] - job["busiest_worker_s"]
    assert precompute["workers"]["work_speedup"] == (precompute["workers"]["jobs"]["1"]["busiest_worker_s"]
                                                      / precompute["workers"]["jobs"]["2"]["busiest_worker_s"])
    configs = parts["accuracy"]["configs"]
    assert list(configs) == ["mlp", "pool", "svp-pool", "svp+sspe", "svp+ssa", "svp"]
    for config in configs.values():
        assert list(config) == ["val", "testA", "testB"]
        for split in config.values():  # one seed: no spread
            assert split["ciou"]["min"] == split["ciou"]["mean"] == split["ciou"]["max"] and split["ciou"]["std"] == 0
            assert split["ciou"]["seeds"] == [split["ciou"]["mean"]]
    assert parts["accuracy"]["seeds"] == dict.fromkeys(configs, 1)
    assert "ciou_minus_mlp" not in configs["mlp"]["val"]
    for config in list(configs.values())[1:]:
        for split, values in config.items():
            assert values["ciou_minus_mlp"]["mean"] == values["ciou"]["mean"] - configs["mlp"][split]["ciou"]["mean"]
    assert latest["ciou_svp_minus_mlp"] == latest["ciou_svp"] - latest["ciou_mlp"]
    # The notes: what the quick preset sets below the full one, and that one seed ranks nothing.
    assert "--steps 2 (full preset: 1000)" in parts["accuracy"]["notes"]
    assert "--workers-images 2 (full preset: 128)" in parts["precompute"]["notes"]
    assert any(note.startswith("mlp, pool, svp-pool, svp+sspe, svp+ssa, svp: one seed, which cannot rank")
               for note in parts["accuracy"]["notes"])
    assert any(note.startswith("2 steps, before the ~500") for note in parts["accuracy"]["notes"])
    assert [f"{name}: {note}" for name in parts for note in parts[name]["notes"]] == [
        note for note in latest["notes"] if note.split(":")[0] in parts]
    assert latest["preset"] == "quick" and len(latest["load_average"]) == 3


def test_accuracy_compares_each_seed_with_mlps_same_seed() -> None:
    """Differences are taken seed by seed (seed s of every configuration trains on the same batches),
    over the seeds both ran: mlp runs ``--headline-seeds``, the ladder's rungs only ``--seeds``."""
    def runs(cious: list[float]) -> list[dict]:
        return [{split: {"ciou": c, "giou": c / 2, "tokens_mean": 9.0, "all_foreground_ciou": 0.1, "samples": 4}
                 for split in accuracy.SPLITS} for c in cious]

    mlp = runs([0.30, 0.50, 0.40])
    svp = accuracy.summarise(runs([0.31, 0.51, 0.42]), mlp)["val"]
    assert svp["ciou"]["seeds"] == [0.31, 0.51, 0.42] and svp["giou"]["seeds"] == [0.155, 0.255, 0.21]
    assert svp["ciou_minus_mlp"]["mean"] == pytest.approx(0.04 / 3)
    assert svp["ciou_minus_mlp"]["std"] == pytest.approx(statistics.stdev([0.01, 0.01, 0.02]))
    assert svp["ciou_minus_mlp"]["std"] < svp["ciou"]["std"] / 5  # seeds differ far more than svp and mlp do
    assert "ciou_minus_mlp" not in accuracy.summarise(mlp, None)["val"]
    rung = accuracy.summarise(runs([0.35, 0.45]), mlp)["val"]["ciou_minus_mlp"]
    assert (rung["mean"] == pytest.approx(0.0) and rung["min"] == pytest.approx(-0.05)
            and rung["max"] == pytest.approx(0.05))
    with pytest.raises(ValueError):  # a seed without its mlp run is an error, not a shorter comparison
        accuracy.summarise(runs([0.3, 0.4, 0.5, 0.6]), mlp)


def test_the_headline_pair_trains_more_seeds_than_the_ladder() -> None:
    args = parse_args(PARTS, ["--preset", "full"], "bench", "")
    assert accuracy.seeds_per_config(args, accuracy.LADDER) == {
        "mlp": 5, "pool": 2, "svp-pool": 2, "svp+sspe": 2, "svp+ssa": 2, "svp": 5}
    args = parse_args(PARTS, [], "bench", "")  # the cpu preset: the pair paired over 3 seeds, the rungs 1
    assert accuracy.seeds_per_config(args, accuracy.LADDER) == {
        "mlp": 3, "pool": 1, "svp-pool": 1, "svp+sspe": 1, "svp+ssa": 1, "svp": 3}
    args = parse_args(PARTS, ["--seeds", "3", "--headline-seeds", "1"], "bench", "")
    assert set(accuracy.seeds_per_config(args, ["mlp", "svp+ssa", "svp"]).values()) == {3}
    args = parse_args(PARTS, ["--quick"], "bench", "")
    assert set(accuracy.seeds_per_config(args, accuracy.LADDER).values()) == {1}


# The cpu preset's sizes before the full preset took them over: `make bench BENCH_FLAGS="--preset full"`
# must stay the run behind the recorded CPU figures.
FULL = {"images": 400, "steps": 1000, "seeds": 2, "headline_seeds": 5, "batch_size": 8, "repeats": 5,
        "step_batch_size": 8, "llm_sizes": "tiny,768x12", "loader_batches": 20, "embedding_sam_models": "vit_b",
        "embedding_batch_size": 2, "embedding_repeats": 2, "precompute_images": 8, "workers_images": 128,
        "image_size": 256, "points_per_side": 8, "precompute_sam_pretrain_steps": 200, "device": "cpu",
        "configs": "mlp,pool,svp-pool,svp+sspe,svp+ssa,svp"}


def test_the_full_preset_is_the_recorded_run_and_the_default_cpu_preset_smaller() -> None:
    full, cpu = (vars(parse_args(PARTS, argv, "bench", "")) for argv in (["--preset", "full"], []))
    assert {key: full[key] for key in FULL} == FULL and full["preset"] == "full" and cpu["preset"] == "cpu"
    shrunk = {key for key in FULL if cpu[key] != FULL[key]}
    assert shrunk == {"steps", "seeds", "headline_seeds", "repeats", "embedding_batch_size", "embedding_repeats",
                      "workers_images", "configs"}
    assert all(cpu[key] < FULL[key] for key in shrunk - {"configs"})
    assert set(cpu["configs"].split(",")) == {"mlp", "pool", "svp"} < set(FULL["configs"].split(","))
    assert parse_args(PARTS, ["--steps", "1000"], "bench", "").steps == 1000  # a flag still wins


def test_the_notes_say_each_value_below_the_full_preset() -> None:
    args = parse_args(PARTS, ["--steps", "1000"], "bench", "")
    notes = differences_from_full(args, accuracy.PRESETS["full"])
    assert notes == [f"--seeds {args.seeds} (full preset: 2)",
                     f"--headline-seeds {args.headline_seeds} (full preset: 5)",
                     f"--configs {args.configs} (full preset: {','.join(accuracy.LADDER)})"]
    assert differences_from_full(parse_args(PARTS, ["--preset", "full"], "bench", ""), accuracy.PRESETS["full"]) == []


def test_the_accuracy_notes_give_seeds_and_steps_and_flag_single_seeds() -> None:
    notes = accuracy.budget_notes({"mlp": 3, "pool": 1, "svp+ssa": 1, "svp": 3}, 300)
    assert notes[0] == "mlp, svp: 3 seeds × 300 steps; pool, svp+ssa: 1 seed × 300 steps"
    assert notes[1].startswith("pool, svp+ssa: one seed, which cannot rank a configuration")
    assert notes[2].startswith("300 steps, before the ~500 after which the head starts to select") and len(notes) == 3
    assert accuracy.budget_notes({"mlp": 5, "svp": 5}, 1000) == ["mlp, svp: 5 seeds × 1000 steps"]


def test_a_busy_cpu_is_said() -> None:
    cores = os.cpu_count()
    assert shared_cpu_note(float(cores)) == []
    (note,) = shared_cpu_note(2.0 * cores)
    assert f"{2.0 * cores:.1f} on {cores} cores" in note


def test_bf16_train_step_with_an_llm_built_from_a_config(ray_local, tmp_path) -> None:
    """What ``make bench-gpu`` times, at toy sizes on the CPU: bf16 autocast, the LLM stored in bf16.

    Its own work directory: rebuilding the quick run's dataset in place would need the tiny SAM's
    pretraining to repeat bit for bit in this process, which it did not always do (its checkpoint's
    hash is part of the shards' config, and a changed config is refused)."""
    work = tmp_path / "work"
    results = train_step.main(["--preset", "quick", "--allow-busy", "--dtype", "bf16", "--llm-sizes", "64x2",
                               "--step-batch-size", "1",
                               "--results", str(tmp_path / "results"), "--work", str(work)])
    assert results["dtype"] == "bf16" and list(results["sizes"]) == ["64x2"]
    rows = results["sizes"]["64x2"]["projectors"]
    assert all(row["step_s"] > 0 and row["latency_s"] > 0 for row in rows.values())
    assert rows["svp"]["tokens_mean"] < rows["mlp"]["tokens_mean"] == 256
    with safe_open(str(work / "llm-64x2-bfloat16" / "model.safetensors"), "pt") as stored:
        assert {stored.get_tensor(name).dtype for name in stored.keys()} == {torch.bfloat16}


def test_gpu_preset_sizes_and_explicit_flags_win() -> None:
    args = parse_args(PARTS, ["--preset", "gpu"], "bench", "")
    assert (args.device, args.dtype, args.sam_model) == ("cuda", "bf16", "vit_h")
    large = LlmSize(args.llm_sizes.split(",")[-1])
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, **large.config_fields()))
    parameters = sum(p.numel() for p in model.parameters())
    assert 0.5e9 < parameters < 1e9
    args = parse_args(PARTS, ["--preset", "gpu", "--device", "cpu", "--sam-model", "tiny", "--steps", "3"], "bench", "")
    assert (args.device, args.sam_model, args.steps, args.dtype) == ("cpu", "tiny", 3, "bf16")


def test_the_sam_npy_headline_is_the_first_real_sams() -> None:
    assert train_step.headline_embedding_step([("tiny", 0.6), ("vit_b", 0.02)]) == ("vit_b", 0.02)
    assert train_step.headline_embedding_step([("vit_h", 0.1), ("vit_b", 0.02)]) == ("vit_h", 0.1)
    assert train_step.headline_embedding_step([("tiny", 0.6), ("tiny", 0.5)]) == ("tiny", 0.6)


@pytest.mark.parametrize("name", ["big", "100x2", "64x0", "64"])
def test_llm_sizes_are_refused_unless_hidden_x_layers(name) -> None:
    with pytest.raises(ValueError, match="LLM size"):
        LlmSize(name).config_fields()


def test_precompute_profile_splits_each_generators_time(tiny_sam_checkpoint: Path, tmp_path: Path) -> None:
    """``bench.precompute --profile``: the decoder, upsampling and encoder seconds of both generators,
    each a part of its run's total."""
    options = SamOptions(str(tiny_sam_checkpoint), "tiny", points_per_side=2, **precompute.RANDOM_WEIGHT_THRESHOLDS)
    images = precompute.dataset_images(tmp_path / "refer", 2, 64)
    profiles = precompute.profile_generators(options, images, "cpu")
    assert set(profiles) == {"reference", "ours"}
    for profile in profiles.values():
        parts = [profile[label] for label, _ in precompute.PROFILED]
        assert all(seconds > 0 for seconds in parts) and sum(parts) < profile["total_s"]


def test_a_busy_machine_is_refused_unless_allowed_and_the_results_then_say_so(monkeypatch, capsys):
    from bench.common import machine_load

    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.4, 0.2))
    with pytest.raises(SystemExit, match="busy .1-minute load average 1.50 >= 0.5"):
        machine_load(parse_args(PARTS, [], "bench", ""))
    record = machine_load(parse_args(PARTS, ["--allow-busy"], "bench", ""))
    assert record["load_average_before"] == [1.5, 0.4, 0.2] and record["busy"] is True
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.4, 0.2))
    assert machine_load(parse_args(PARTS, [], "bench", ""))["busy"] is False
    assert "load average before the run: 0.30 0.40 0.20" in capsys.readouterr().out


def test_inference_benchmark_times_each_stage_of_a_new_image_for_svp_and_mlp(tmp_path):
    """The plumbing of `python -m bench.inference` at the demo's sizes: every stage timed for both
    projectors; only svp makes superpixels; precomputed inputs skip SAM's encoder."""
    from bench import inference

    results = inference.main(["--stacks", "demo", "--batch-size", "2", "--repeats", "1", "--points-per-side", "4",
                              "--allow-busy", "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    assert json.loads((tmp_path / "results" / "inference.json").read_text()) == results
    assert {"load_average_before", "busy", "git_commit"} <= set(results)
    rows = results["stacks"]["demo"]
    assert set(rows["svp_over_mlp"]) == {"new_1", "new_2", "precomputed_1", "precomputed_2"}
    for kind in ("mlp", "svp"):
        for mode, seconds in rows[kind]["seconds_per_image"].items():
            assert set(seconds) == {*inference.STAGES, "total"} and seconds["total"] > 0
            assert seconds["total"] >= sum(v for k, v in seconds.items() if k != "total") * 0.999
            assert (seconds["sam_encoder"] > 0) == (seconds["vision"] > 0) == mode.startswith("new")
            assert (seconds["superpixels"] > 0) == (kind == "svp" and mode.startswith("new"))
            assert seconds["llm_body"] > 0 and seconds["mask_head"] > 0
    assert rows["svp"]["visual_tokens"] < rows["mlp"]["visual_tokens"]


def test_a_run_without_realsize_keeps_the_earlier_realsize_entry(tmp_path: Path) -> None:
    """``make bench`` (no --realsize) rewrites precompute.json: the real-size comparison measured
    before, with its own commit, stays in it, marked as kept; an unreadable file keeps nothing."""
    path = tmp_path / "precompute.json"
    assert precompute.earlier_realsize(path) is None
    entry = {"speedup": 10.2, "git_commit": "abc123", "agreement": {"mean_iou": 0.999}}
    path.write_text(json.dumps({"generators": {}, "realsize": entry}))
    kept = precompute.earlier_realsize(path)
    assert kept == {**entry, "kept_from_an_earlier_run": True}
    assert precompute.format_realsize(kept) == [
        "real size: not measured in this run; kept from the one at abc123 (--realsize measures it)"]
    for text in ("{not json", json.dumps({"generators": {}}), json.dumps([1])):
        path.write_text(text)
        assert precompute.earlier_realsize(path) is None
