"""``python -m bench.ablation --quick``: every rung trained and evaluated on each probe, the results'
schema, figures that are the evaluation's own, and the paired t-interval."""

from __future__ import annotations

import json
import math
import pickle
import statistics
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench import ablation
from bench.common import Workspace, parse_args
from jobs.eval import run_eval
from jobs.workflow import SyntheticData


@pytest.fixture(scope="module")
def quick(tmp_path_factory, ray_local) -> tuple[Path, dict]:
    """The quick preset (2 seeds of 2 steps) with --only-parts: each part's two rungs on its probe."""
    results = tmp_path_factory.mktemp("ablation")
    return results, ablation.main(["--quick", "--only-parts", "--allow-busy", "--sam-pretrain-steps", "0",
                                   "--results", str(results), "--work", str(results / "work")])


def test_quick_ablation_writes_every_rung_of_every_probe_and_each_parts_difference(quick) -> None:
    results, returned = quick
    written = json.loads((results / "ablation.json").read_text())
    assert written == json.loads(json.dumps(returned))
    assert len(written["git_commit"].removesuffix("-dirty")) == 40
    assert written["rungs"] == ["svp-pool", "svp+sspe", "svp"]
    assert written["shuffle_tokens"] is True and written["only_parts"] is True
    assert {name: list(rungs) for name, rungs in written["probes"].items()} == {
        "place": ["svp-pool", "svp+sspe"], "inside": ["svp+sspe", "svp"]}  # the parts' pairs, nothing else
    assert not (results / "work" / "data").exists()  # no plain dataset for --only-parts
    for probe in written["probes"].values():
        for rung in probe.values():
            seeds = rung["ciou"]["seeds"]
            assert len(seeds) == 2 and all(0 <= c <= 1 for c in seeds)
            assert rung["ciou"]["mean"] == statistics.fmean(seeds)
            assert 0 < rung["all_foreground_ciou"] < 1 and rung["samples"] > 0
            share = rung["referred_share"]  # None only if no seed's prediction touched an object
            assert share is None or (len(share["seeds"]) == 2 and 0 <= share["mean"] <= 1)
    for part, (upper, lower, probe) in ablation.PARTS.items():
        paired = written["paired_difference"][part]
        assert set(paired) >= {"mean", "low", "high"} and paired["rungs"] == [upper, lower] and paired["probe"] == probe
        differences = [a - b for a, b in zip(written["probes"][probe][upper]["ciou"]["seeds"],
                                              written["probes"][probe][lower]["ciou"]["seeds"], strict=True)]
        assert paired["mean"] == pytest.approx(statistics.fmean(differences))
        assert paired["low"] <= paired["mean"] <= paired["high"]
        assert written["headline"][f"ablation_{part}_ciou_gain"] == paired["mean"]
        shares = [(a, b) for a, b in zip(*(ablation._share_seeds(written["probes"][probe][rung])
                                           for rung in (upper, lower)), strict=True) if None not in (a, b)]
        if shares:
            assert paired["referred_share"]["mean"] == pytest.approx(statistics.fmean(a - b for a, b in shares))
        else:
            assert "referred_share" not in paired
    assert Image.open(written["figure"]).size[0] > 0
    assert "--steps 2 (full preset: 2500)" in written["notes"]


def test_the_figures_are_those_of_evaluating_the_trained_runs(quick) -> None:
    """Each seed's cIoU is what ``svp eval`` gives for that run directory, on the probe's own held-out splits."""
    results, written = quick
    work = results / "work"
    for probe, rung, seed in (("place", "svp+sspe", 1), ("inside", "svp", 0)):
        splits = run_eval(work / "ablation" / probe / rung / f"seed{seed}", str(work / f"data-{probe}" / "shards"),
                          list(ablation.SPLITS))[0]["splits"]
        assert written["probes"][probe][rung]["ciou"]["seeds"][seed] == statistics.fmean(
            splits[split]["ciou"] for split in ablation.SPLITS)
        assert written["probes"][probe][rung]["giou"]["seeds"][seed] == statistics.fmean(
            splits[split]["giou"] for split in ablation.SPLITS)
        shares = [splits[split]["referred_share"] for split in ablation.SPLITS
                  if splits[split]["referred_share"] is not None]
        share = written["probes"][probe][rung]["referred_share"]
        assert (share["seeds"][seed] if share else None) == (statistics.fmean(shares) if shares else None)
        # The samples are the probe's held-out sentences, and the tokens its superpixels.
        with open(work / f"data-{probe}" / "refer" / "refcoco" / "refs(unc).p", "rb") as file:
            refs = pickle.load(file)
        held_out = [ref for ref in refs if ref["split"] in ablation.SPLITS]
        assert written["probes"][probe][rung]["samples"] == sum(len(ref["sentences"]) for ref in held_out)
        index = pq.read_table(work / f"data-{probe}" / "shards" / "index.parquet").to_pylist()
        assert max(row["num_superpixels"] or 0 for row in index) >= written["probes"][probe][rung]["tokens_mean"] > 1


def test_a_rerun_keeps_the_finished_runs_of_the_same_settings_and_only_those(quick) -> None:
    results, _ = quick
    work = results / "work"
    args = parse_args([ablation], ["--quick", "--sam-pretrain-steps", "0"], "bench", "")
    data = {"place": SyntheticData.under(work / "data-place")}
    (run,) = [r for r in ablation.runs(args, Workspace(work, 16, 0, 0), ["svp-pool"], data) if r.seed == 0]
    record = run.run_dir / "ablation_run.json"
    saved = json.loads(record.read_text())
    saved["splits"]["val"]["ciou"] = 0.5  # no run of 2 steps reaches this: only the record can hold it
    record.write_text(json.dumps(saved))
    assert ablation.train_and_evaluate(run)["val"]["ciou"] == 0.5
    # A record from before the referred share was counted: evaluated again, not trained again.
    trained = (run.run_dir / "run_config.json").stat().st_mtime_ns
    del saved["splits"]["val"]["referred_share"]
    record.write_text(json.dumps(saved))
    evaluated = ablation.train_and_evaluate(run)
    assert evaluated["val"]["ciou"] != 0.5 and "referred_share" in evaluated["val"]
    assert (run.run_dir / "run_config.json").stat().st_mtime_ns == trained
    assert ablation.train_and_evaluate(replace(run, steps=3))["val"]["ciou"] != 0.5  # other settings: trained anew
    assert json.loads(record.read_text())["run"]["steps"] == 3


def test_paired_interval_is_the_t_interval_and_a_single_pair_has_none() -> None:
    interval = ablation.t_interval([0.01, 0.02, 0.03])
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 degrees of freedom) · sd / √n
    assert interval == pytest.approx({"mean": 0.02, "low": 0.02 - half, "high": 0.02 + half, "pairs": 3})
    assert ablation.t_interval([0.05]) == {"mean": 0.05, "low": 0.05, "high": 0.05, "pairs": 1}


@pytest.mark.parametrize("flags, message", [(["--rungs", "svp,colour"], "--rungs: unknown colour"),
                                            (["--datasets", "refcoco"], "--datasets: unknown refcoco"),
                                            (["--seeds", "0"], "--seeds, --steps and --jobs must be >= 1")])
def test_bad_sizes_are_refused_before_any_data_is_made(tmp_path, capsys, flags, message) -> None:
    with pytest.raises(SystemExit) as exit:
        ablation.main(["--quick", "--allow-busy", "--results", str(tmp_path), "--work", str(tmp_path / "w"), *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w" / "data").exists() and not (tmp_path / "ablation.json").exists()
