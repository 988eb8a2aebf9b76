"""svp inspect: the pictures, the summary's numbers, the drawn boundaries against the label maps,
failures by stage, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as coco_mask
from scipy.ndimage import distance_transform_cdt
from skimage.segmentation import find_boundaries

from jobs.inspect import default_report_dir
from jobs.inspect import main as svp_inspect
from jobs.precompute import main as precompute
from pipeline.inspect import (
    BOUNDARY_COLOUR,
    PICTURES,
    REF_COLOUR,
    REF_OUTLINE_PX,
    InspectError,
    choose_rows,
    draw_tile,
    inspect_output,
    read_output,
    read_samples,
    superpixel_areas,
)
from pipeline.shards import decode_label_map
from pipeline.synth import synthesize

SAMPLES = 6


def _inspect(*argv: str) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = svp_inspect(list(argv))
    return status, printed.getvalue()


@pytest.fixture(scope="module")
def report(shards, tmp_path_factory) -> tuple[Path, str]:
    report_dir = tmp_path_factory.mktemp("inspect")
    status, printed = _inspect(str(shards), "--report-dir", str(report_dir), "--samples", str(SAMPLES), "--html")
    assert status == 0
    return report_dir, printed


@pytest.fixture(scope="module")
def failing_output(tmp_path_factory, ray_local) -> Path:
    """Six images: one truncated (fails at decode), one missing (fails at read), one large (scaled
    down on the contact sheet)."""
    root = tmp_path_factory.mktemp("refer-broken")
    synthesize(root, images=6, seed=2, sizes=[(200, 150)] * 5 + [(900, 640)])
    image_dir = root / "images/mscoco/images/train2014"
    first = image_dir / f"COCO_train2014_{1:012d}.jpg"
    first.write_bytes(first.read_bytes()[:200])
    (image_dir / f"COCO_train2014_{2:012d}.jpg").unlink()
    out = tmp_path_factory.mktemp("out-broken")
    assert precompute(["--refer-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out),
                       "--backend", "felzenszwalb", "--shard-size", "3", "--workers", "1"]) == 0
    return out


def test_inspect_writes_valid_pictures_and_prints_the_summary(report):
    report_dir, printed = report
    for name in PICTURES:
        with Image.open(report_dir / name) as image:
            image.verify()
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250, name
    with Image.open(report_dir / "contact_sheet.png") as sheet:
        colours = np.asarray(sheet.convert("RGB")).reshape(-1, 3)
    assert (colours == BOUNDARY_COLOUR).all(1).sum() > 100 and (colours == REF_COLOUR).all(1).sum() > 10
    summary = (report_dir / "summary.txt").read_text()
    assert printed.startswith(summary) and str(report_dir / "contact_sheet.png") in printed


def test_summary_numbers_are_the_manifest_and_index_numbers(shards, report):
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = pq.read_table(shards / "index.parquet").to_pylist()
    summary = inspect_output(shards, report[0] / "again", samples=2).summary
    assert summary["backend"] == manifest["config"]["backend"] == "felzenszwalb"
    assert summary["config_hash"] == manifest["config_hash"]
    assert summary["images"]["written"] == manifest["images_written"] == len(rows)
    assert set(summary["splits"]) == set(manifest["samples_by_split"])
    shards_per_split = Counter(shard["split"] for shard in manifest["shards"])
    for split, entry in summary["splits"].items():
        assert entry["written"] == entry["samples"] == manifest["samples_by_split"][split]
        assert entry["shards"] == shards_per_split[split] and entry["failed"] == 0
    counts = np.array([row["num_superpixels"] for row in rows])
    spx = summary["superpixels_per_image"]
    assert spx["mean"] == pytest.approx(counts.mean()) and spx["median"] == np.median(counts)
    assert spx["p95"] == pytest.approx(np.percentile(counts, 95)) and spx["max"] == counts.max()
    text = (report[0] / "summary.txt").read_text()
    assert manifest["config_hash"] in text and "failures: none" in text
    for split, samples in manifest["samples_by_split"].items():
        assert re.search(rf"^{split}\s+{samples}\s+0\s+{shards_per_split[split]}\s+{samples}$", text, re.M), split


def test_a_drawn_tile_matches_its_label_map_and_outlines_the_ref_mask(shards):
    output = read_output(shards)
    rows = choose_rows(output.rows, SAMPLES, seed=0)
    by_key = {sample["__key__"]: sample for sample in wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")),
                                                                      shardshuffle=False)}
    for sample in read_samples(shards, rows, seed=0):
        stored = by_key[sample.key]
        labels = decode_label_map(stored["spx.png"])
        assert np.array_equal(sample.labels, labels)
        masks = [coco_mask.decode({**ref["segmentation"], "counts": ref["segmentation"]["counts"].encode()})
                 for ref in json.loads(stored["refs.json"])]
        assert any(np.array_equal(sample.mask, mask) for mask in masks)
        tile = draw_tile(sample.rgb, sample.labels, sample.mask)
        drawn_outline = (tile == REF_COLOUR).all(-1)
        # the outline: mask pixels at most REF_OUTLINE_PX 4-connected steps from a pixel outside the mask
        steps = distance_transform_cdt(sample.mask, metric="taxicab")
        assert np.array_equal(drawn_outline, (sample.mask == 1) & (steps <= REF_OUTLINE_PX))
        assert drawn_outline.any() and not (drawn_outline & (sample.mask == 0)).any()
        boundaries = find_boundaries(labels, mode="thick") & ~drawn_outline
        assert boundaries.any() and (tile[boundaries] == BOUNDARY_COLOUR).all()
        untouched = ~boundaries & ~drawn_outline
        assert np.array_equal(tile[untouched], sample.rgb[untouched])


def test_sampling_is_seeded_spread_over_splits_and_reads_only_the_shards_it_needs(shards, tmp_path):
    rows = read_output(shards).rows
    first = choose_rows(rows, 4, seed=0)
    assert [r["key"] for r in first] == [r["key"] for r in choose_rows(rows, 4, seed=0)]
    assert {r["split"] for r in first} == {"train", "val", "testA", "testB"}
    assert [r["key"] for r in choose_rows(rows, 8, seed=0)] != [r["key"] for r in choose_rows(rows, 8, seed=1)]
    assert {r["split"] for r in choose_rows(rows, 3, seed=0, split="val")} == {"val"}
    # a copy holding only the sampled images' shards is enough
    for name in ["manifest.json", "index.parquet", "failures.jsonl", *{r["shard"] for r in first}]:
        shutil.copy(shards / name, tmp_path / name)
    partial = inspect_output(tmp_path, tmp_path / "report", samples=4, seed=0)
    assert [s.key for s in partial.samples] == [r["key"] for r in first]
    assert len(superpixel_areas(partial.samples)) == sum(len(np.unique(s.labels)) for s in partial.samples)
    # ... but a sampled image's shard missing from the copy is a clear refusal, naming it
    shutil.copy(shards / "index.parquet", tmp_path / "index.parquet")
    (tmp_path / first[0]["shard"]).unlink()
    with pytest.raises(InspectError, match=re.escape(first[0]["shard"]) + " not found"):
        read_samples(tmp_path, first, seed=0)


def test_failures_appear_by_stage_with_an_example(failing_output, tmp_path):
    status, printed = _inspect(str(failing_output), "--html", "--samples", "4")
    assert status == 0
    report_dir = failing_output / "inspect"  # the default for a local OUT
    failures = [json.loads(line) for line in (failing_output / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["stage"] for f in failures) == ["decode", "read"]
    summary = inspect_output(failing_output, tmp_path, samples=1).summary
    assert {stage: e["count"] for stage, e in summary["failures_by_stage"].items()} == {"decode": 1, "read": 1}
    assert sum(e["failed"] for e in summary["splits"].values()) == 2 and summary["images"]["failed"] == 2
    text = (report_dir / "summary.txt").read_text()
    for failure in failures:
        line = next(line for line in text.splitlines() if line.strip().startswith(failure["stage"]))
        assert failure["file_name"] in line and line.split()[1] == "1"
    assert failures[0]["file_name"] in (report_dir / "inspect.html").read_text()
    assert printed.startswith(text)


def test_bad_arguments_and_inputs_are_named(shards, tmp_path, capsys):
    assert svp_inspect([str(shards), "--split", "test", "--report-dir", str(tmp_path)]) == 2
    assert "'test'" in (err := capsys.readouterr().err) and "testA" in err
    assert svp_inspect([str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    assert svp_inspect([str(shards), "--samples", "0", "--report-dir", str(tmp_path)]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert default_report_dir(str(shards)) == shards / "inspect"
    assert default_report_dir("s3://bucket/data/refcoco-unc/") == Path("inspect-refcoco-unc")


# ---------------------------------------------------------------------------------------------
# The HTML page


def test_html_is_self_contained(report):
    report_dir, _ = report
    page = (report_dir / "inspect.html").read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert len(links) == len(PICTURES) and all(link.startswith("data:image/png;base64,") for link in links)
    for name, link in zip(PICTURES, links):
        assert base64.b64decode(link.split(",", 1)[1]) == (report_dir / name).read_bytes()
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page) and "url(" not in page


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the HTML rendering test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium); set CI to make this a failure")
    return found


def test_html_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    report_dir, _ = report
    probe = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'widths';"
             " p.textContent = [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',');"
             " document.body.appendChild(p); });</script></body>")
    page = tmp_path / "probe.html"
    page.write_text((report_dir / "inspect.html").read_text().replace("</body>", probe))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    widths = re.search(r'<pre id="widths">([^<]*)</pre>', dom)
    assert widths, dom[-2000:]
    expected = [Image.open(report_dir / name).width for name in PICTURES]
    assert [int(w) for w in widths.group(1).split(",")] == expected
