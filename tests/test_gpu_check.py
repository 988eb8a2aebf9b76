"""``make gpu-check``'s CPU dry run: the same steps at toy sizes, so that the script works the day a GPU is lent."""

from __future__ import annotations

import json
import sys

import pytest

from bench import gpu_check

STEPS = ["synth", "precompute", "train", "eval", "predict", "bench.precompute", "bench.inference"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_dry_run_runs_every_step_and_records_it(tmp_path):
    results = tmp_path / "results"
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path / "work"), "--results", str(results)]) == 0
    report = json.loads((results / "check.json").read_text())
    assert report["ok"] and report["dry_run"] and report["git_commit"]
    assert [step["step"] for step in report["steps"]] == STEPS
    assert all(step["status"] == "ok" and step["seconds"] > 0 for step in report["steps"])
    assert (tmp_path / "work" / "overlay.png").stat().st_size > 0
    assert {"precompute.json", "inference.json"} <= {path.name for path in results.iterdir()}


def test_a_failed_step_stops_the_chain_and_says_which(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "steps", lambda args: [
        ("first", [sys.executable, "-c", "pass"]),
        ("second", [sys.executable, "-c", "import sys; sys.exit('no GPU here')"]),
        ("third", [sys.executable, "-c", "pass"])])
    results = tmp_path / "results"
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path), "--results", str(results)]) == 1
    report = json.loads((results / "check.json").read_text())
    assert not report["ok"]
    assert [step["status"] for step in report["steps"]] == ["ok", "failed", "not run"]
    assert "no GPU here" in report["steps"][1]["stderr_tail"]
    assert "second: failed" in capsys.readouterr().out
