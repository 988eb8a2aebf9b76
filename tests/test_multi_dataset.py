"""One precompute of refcoco, refcoco+ and refcocog (which annotate the same images), read by (dataset,
split): each image segmented and written once, honest per-source counts, resume, and training on a
weighted mixture that never takes an evaluation split's refs as targets."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import pickle
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from jobs.precompute import main as precompute
from pipeline.precompute import SelectionError, plan_shards, problem_rows, select
from pipeline.refer import load_refer, load_refs_pickle, refer_images
from pipeline.shards import ManifestError
from trainer.data import DataConfig, DataError, _Mixture, make_loader, parse_sources, shard_urls

DATASETS = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
SMALL = DataConfig(vision_size=32, sam_size=64, shuffle_buffer=8, length_group=1)


def _refers(root: Path) -> list:
    return [load_refer(root, dataset, split_by) for dataset, split_by in DATASETS]


def _sources_by_image(root: Path) -> dict[int, dict[str, list]]:
    """What the REFER files say, independently of the pipeline: image_id -> {dataset/split: its refs}."""
    by_image: dict[int, dict[str, list]] = defaultdict(dict)
    for refer in _refers(root):
        for sample in refer.samples:
            by_image[sample.image.image_id][f"{refer.dataset}/{sample.split}"] = sample.refs
    return by_image


def _precompute_args(root: Path, out: Path, sam: Path) -> list[str]:
    return ["--refer-root", str(root), "--dataset", "refcocog,refcoco,refcoco+", "--out", str(out),
            "--backend", "felzenszwalb", "--shard-size", "2", "--workers", "2", "--store-sam-embeddings",
            "--sam-checkpoint", str(sam), "--sam-model", "tiny"]


def _files(out: Path) -> dict[str, bytes]:
    names = [p for p in out.iterdir() if p.suffix == ".tar"] + [out / n for n in ("manifest.json", "index.parquet",
                                                                                  "failures.jsonl", "config.json")]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def multi_out(synth_root, tiny_sam_checkpoint, tmp_path_factory, ray_local) -> Path:
    out = tmp_path_factory.mktemp("multi")
    assert precompute(_precompute_args(synth_root, out, tiny_sam_checkpoint)) == 0
    return out


# ------------------------------------------------------------------------------------------------
# Precompute


def test_three_datasets_write_each_unique_image_once_and_segment_it_once(synth_root, multi_out):
    by_image = _sources_by_image(synth_root)
    assert len(by_image) == 12 and any(len(sources) > 1 for sources in by_image.values())
    manifest = json.loads((multi_out / "manifest.json").read_text())
    assert manifest["images_total"] == manifest["images_written"] == len(by_image)
    assert manifest["config"]["dataset"] == "refcoco,refcoco+,refcocog"  # given as refcocog,refcoco,refcoco+
    assert manifest["config"]["split_by"] == "unc,unc,umd"  # the defaults
    timing = json.loads((multi_out / "timing.json").read_text())
    assert timing["total"]["segmented"] == len(by_image), "the backend ran once per unique image"
    assert timing["total"]["seconds"]["embeddings"] > 0

    tars = sorted(str(p) for p in multi_out.glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == [f"coco-{i:012d}" for i in sorted(by_image)]
    for sample in samples:
        assert np.load(io.BytesIO(sample["sam.npy"]), allow_pickle=False).shape == (64, 32, 32)
        image_id = json.loads(sample["meta.json"])["image_id"]
        refs = json.loads(sample["refs.json"])
        written = Counter(f"{ref['dataset']}/{ref['split']}" for ref in refs)
        assert written == {source: len(expected) for source, expected in by_image[image_id].items()}
        for ref in refs:
            assert ref["split_by"] == dict(DATASETS)[ref["dataset"]]
            expected = by_image[image_id][f"{ref['dataset']}/{ref['split']}"]
            assert ref["sentences"] == next(r.sentences for r in expected if r.ref_id == ref["ref_id"])


def test_manifest_and_index_count_each_source_and_report_shared_images(synth_root, multi_out):
    by_image = _sources_by_image(synth_root)
    manifest = json.loads((multi_out / "manifest.json").read_text())
    expected: dict[str, dict[str, int]] = {}
    for sources in by_image.values():
        for source, refs in sources.items():
            count = expected.setdefault(source, {"images": 0, "failed": 0, "refs": 0, "sentences": 0})
            count["images"] += 1
            count["refs"] += len(refs)
            count["sentences"] += sum(len(r.sentences) for r in refs)
    assert manifest["sources"] == expected
    assert {"refcoco/val", "refcocog/val", "refcoco+/testB"} <= set(expected)
    pairs = Counter(" & ".join(p) for s in by_image.values() for p in itertools.combinations(sorted(s), 2))
    assert manifest["overlaps"] == dict(pairs) and manifest["overlaps"]["refcoco/val & refcocog/train"] >= 1
    assert manifest["images_in_several_sources"] == sum(len(s) > 1 for s in by_image.values())

    # Every image of a shard serves exactly the sources its manifest entry lists.
    for shard in manifest["shards"]:
        keys = [s["__key__"] for s in wds.WebDataset(str(multi_out / shard["name"]), shardshuffle=False)]
        assert keys and all(set(by_image[int(key.split("-")[1])]) == set(shard["sources"]) for key in keys)
        assert set(shard["sources"].values()) == {shard["samples"]}
    index = pq.read_table(multi_out / "index.parquet").to_pylist()
    assert len(index) == 12 and {row["status"] for row in index} == {"written"}
    for row in index:
        assert {e["source"]: e["refs"] for e in row["sources"]} == {
            source: len(refs) for source, refs in by_image[row["image_id"]].items()}
        assert row["num_refs"] == sum(e["refs"] for e in row["sources"])


def test_resume_redoes_only_a_deleted_shard_and_the_rerun_is_byte_identical(multi_out, synth_root,
                                                                            tiny_sam_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(multi_out, out)
    lost = sorted(out.glob("*.tar"))[1].name
    records = {p.name: p.read_bytes() for p in (out / "_shards").iterdir()}
    (out / lost).unlink()
    capsys.readouterr()
    assert precompute(_precompute_args(synth_root, out, tiny_sam_checkpoint)) == 0
    shards = len(list(multi_out.glob("*.tar")))
    assert f"{shards - 1} of {shards} shards already complete" in capsys.readouterr().err
    redone = {name for name, data in records.items() if (out / "_shards" / name).read_bytes() != data}
    assert redone == {f"{lost}.json"}, "only the lost shard is recomputed"
    assert _files(out) == _files(multi_out)


def test_only_split_and_limit_select_shards_by_source(synth_root):
    images, _ = refer_images(_refers(synth_root))
    plan = plan_shards(images, 2, [dataset for dataset, _ in DATASETS])
    chosen = select(plan, "refcocog/val")
    assert chosen and all("refcocog/val" in task.sources for task in chosen)
    assert {i.image.image_id for t in chosen for i in t.items} == {
        image_id for image_id, sources in _sources_by_image(synth_root).items() if "refcocog/val" in sources}
    with pytest.raises(SelectionError, match="refcocog/test, refcocog/train"):
        select(plan, "val")  # a bare split is ambiguous with several datasets


def test_an_image_one_dataset_cannot_use_is_left_out_whole_and_reported_once(synth_root, tmp_path):
    root = tmp_path / "refer"
    shutil.copytree(synth_root, root)
    refs_file = root / "refcocog" / "refs(umd).p"
    refs = load_refs_pickle(refs_file)
    next(r for r in refs if r["image_id"] == 11)["ann_id"] = 10**9  # a refcocog ref pointing at no annotation
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    instances = json.loads((root / "refcoco+" / "instances.json").read_text())
    next(i for i in instances["images"] if i["id"] == 5)["height"] += 1  # refcoco+ disagrees on image 5
    (root / "refcoco+" / "instances.json").write_text(json.dumps(instances))

    refers = _refers(root)
    images, problems = refer_images(refers)
    assert sorted(i.image.image_id for i in images) == [i for i in range(1, 13) if i not in (5, 11)]
    rows = problem_rows([r.dataset for r in refers], problems)
    assert [row["image_id"] for row in rows] == [5, 11]
    by_image = _sources_by_image(synth_root)
    for row in rows:
        assert row["key"] == f"coco-{row['image_id']:012d}" and row["stage"] == "annotations"
        assert sorted(e["source"] for e in row["sources"]) == sorted(by_image[row["image_id"]])
    assert "refcoco+: the datasets describe this image differently" in rows[0]["error"]
    assert "refcocog: ref" in rows[1]["error"] and "refcoco: left out with the image" in rows[1]["error"]


def test_an_image_in_two_splits_is_a_sample_per_split_alone_and_one_sample_among_several_datasets(synth_root,
                                                                                                  tmp_path):
    root = tmp_path / "refer"
    shutil.copytree(synth_root, root)
    refs_file = root / "refcoco" / "refs(unc).p"
    refs = load_refs_pickle(refs_file)
    per_image = Counter(r["image_id"] for r in refs if r["split"] == "train")
    image_id = next(i for i, count in sorted(per_image.items()) if count >= 2)
    next(r for r in refs if r["image_id"] == image_id)["split"] = "val"  # as refcocog google does
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    refcoco = load_refer(root, "refcoco", "unc")
    alone, _ = refer_images([refcoco])
    assert [[p.split for p in i.parts] for i in alone if i.image.image_id == image_id] == [["train"], ["val"]]
    together, _ = refer_images([refcoco, load_refer(root, "refcocog", "umd")])
    [image] = [i for i in together if i.image.image_id == image_id]
    assert [(p.dataset, p.split) for p in image.parts] == [("refcoco", "train"), ("refcoco", "val"),
                                                             ("refcocog", "train")]


def test_dataset_and_split_by_lists_are_checked(synth_root, tmp_path, capsys):
    for flags, message in [(["--dataset", "refcoco,refclef"], "invalid choice: 'refclef'"),
                           (["--dataset", "refcoco,refcoco"], "names a dataset twice"),
                           (["--dataset", "refcoco,refcocog", "--split-by", "unc"], "names 1 splits for 2"),
                           (["--dataset", "refcoco,refcocog", "--split-by", "unc,unc"], "umd")]:
        assert precompute(["--refer-root", str(synth_root), "--out", str(tmp_path / "o"), "--backend", "slic",
                           *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Reading by source


def _items(loader) -> list[tuple[str, str, str, int, int]]:
    return [item for batch in loader for item in zip(batch["keys"], batch["datasets"], batch["splits"],
                                                     batch["ref_ids"], batch["sent_ids"])]


def _source_pairs(root: Path, source: str) -> list[tuple[str, str, str, int, int]]:
    dataset, split = source.split("/")
    return sorted((f"coco-{image_id:012d}", dataset, split, ref.ref_id, sentence["sent_id"])
                  for image_id, sources in _sources_by_image(root).items() for ref in sources.get(source, [])
                  for sentence in ref.sentences)


@pytest.mark.parametrize("source", ["refcocog/val", "refcoco/val", "refcoco+/testB"])
def test_evaluation_of_one_source_yields_exactly_its_refs(synth_root, multi_out, source):
    urls = shard_urls(str(multi_out), "unused", [source])
    assert sorted(_items(make_loader(urls, SMALL, train=False, batch_size=8, sources=[source]))) == \
        _source_pairs(synth_root, source)


def test_shard_urls_of_sources_and_their_errors(multi_out):
    manifest = json.loads((multi_out / "manifest.json").read_text())
    urls = shard_urls(str(multi_out), "train", ["refcoco/val", "refcocog/val:2"])
    assert urls == [str(multi_out / s["name"]) for s in manifest["shards"]
                    if {"refcoco/val", "refcocog/val"} & set(s["sources"])]
    with pytest.raises(ManifestError, match="refcoco/testA, refcoco/testB"):
        shard_urls(str(multi_out), "train", ["refcoco/test"])
    with pytest.raises(ManifestError, match="several datasets, read by"):
        shard_urls(str(multi_out), "train")  # --train-split alone names no source of this output
    assert parse_sources(["refcoco/train", "refcocog/train:2.5"]) == [("refcoco/train", 1.0), ("refcocog/train", 2.5)]
    for bad in (["refcoco/train:x"], ["refcoco/train:0"], ["refcoco/train", "refcoco/train:2"]):
        with pytest.raises(DataError):
            parse_sources(bad)


def test_the_mixture_draws_sources_by_their_weights():
    weights = [1.0, 3.0, 0.5]
    streams = [[{"source": index}] * 100_000 for index in range(len(weights))]
    mixture = _Mixture(streams, weights, seed=0, train=True)
    draws = Counter(sample["source"] for sample in itertools.islice(iter(mixture), 2000))
    for index, weight in enumerate(weights):
        p = weight / sum(weights)
        assert abs(draws[index] - 2000 * p) <= 4 * math.sqrt(2000 * p * (1 - p)), (draws, index)
    again = _Mixture(streams, weights, seed=0, train=True)
    first = [s["source"] for s in itertools.islice(iter(again), 200)]
    assert first == [s["source"] for s in itertools.islice(iter(_Mixture(streams, weights, 0, True)), 200)]
    assert first != [s["source"] for s in itertools.islice(iter(_Mixture(streams, weights, 1, True)), 200)]
    assert [s["source"] for s in _Mixture([[{"source": 0}] * 3, [{"source": 1}] * 2], [1, 1], 0, False)] == \
        [0, 0, 0, 1, 1], "evaluation reads the sources one after the other"


def test_training_on_a_mixture_follows_the_weights_and_never_targets_evaluation_refs(synth_root, multi_out):
    sources = ["refcoco/train:1", "refcocog/train:3"]
    allowed = set(_source_pairs(synth_root, "refcoco/train")) | set(_source_pairs(synth_root, "refcocog/train"))
    by_image = _sources_by_image(synth_root)
    shared = {f"coco-{i:012d}" for i, s in by_image.items() if "refcocog/train" in s and "refcoco/val" in s}
    assert shared, "an image of refcocog train that is refcoco val must be in the data for this test to mean anything"
    urls = shard_urls(str(multi_out), "unused", sources)
    loader = make_loader(urls, SMALL, train=True, batch_size=10, sources=sources)
    items = []
    for batch in loader:
        items += _items([batch])
        if len(items) >= 600:
            break
    loader.close()
    assert set(items) <= allowed, "only refs of the selected (dataset, split)s are training targets"
    count = Counter(dataset for _, dataset, _, _, _ in items)
    p = 3 / 4
    assert abs(count["refcocog"] - len(items) * p) <= 4 * math.sqrt(len(items) * p * (1 - p)), count
    assert shared & {key for key, *_ in items}, "the shared image was drawn, with its refcocog train refs only"

    even = ["refcoco/train", "refcocog/train"]  # a pass, as the training loop reads: it ends when a source runs out
    one_pass = _items(make_loader(urls, SMALL, train=True, batch_size=1, resampled=False, sources=even))
    assert one_pass and set(one_pass) <= allowed and {d for _, d, *_ in one_pass} == {"refcoco", "refcocog"}
    assert one_pass == _items(make_loader(urls, SMALL, train=True, batch_size=1, resampled=False, sources=even))


def test_a_source_with_fewer_shards_than_readers_is_refused(multi_out, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    urls = shard_urls(str(multi_out), "unused", ["refcoco/train", "refcoco/val"])
    with pytest.raises(DataError, match="refcoco/val: fewer shards than the 2 readers"):
        make_loader(urls, SMALL, train=True, batch_size=1, resampled=False, sources=["refcoco/train", "refcoco/val"])


def test_svp_train_on_a_mixture_records_it_and_trains_on_its_images_only(synth_root, multi_out, tiny_sam_checkpoint,
                                                                         tmp_path):
    from train_helpers import train_flags

    from jobs.train import main as svp_train

    run_dir = tmp_path / "run"
    flags = train_flags(multi_out, run_dir, tiny_sam_checkpoint, "--max-steps", "2", "--record-keys",
                        "--train-splits", "refcoco/train,refcocog/train:2")
    assert svp_train(flags) == 0
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["train_splits"] == ["refcoco/train", "refcocog/train:2"]
    manifest = json.loads((multi_out / "manifest.json").read_text())
    assert config["shards"] == [str(multi_out / s["name"]) for s in manifest["shards"]
                                if {"refcoco/train", "refcocog/train"} & set(s["sources"])]
    assert config["data"]["train"]["manifest_sha256"] == hashlib.sha256(
        (multi_out / "manifest.json").read_bytes()).hexdigest()
    train_images = {f"coco-{i:012d}" for i, s in _sources_by_image(synth_root).items()
                    if {"refcoco/train", "refcocog/train"} & set(s)}
    assert set((run_dir / "keys_rank0.txt").read_text().split()) <= train_images
    assert os.path.getsize(run_dir / "keys_rank0.txt") > 0


def test_the_papers_workflow_joint_training_validation_and_the_eight_column_table(multi_out, tiny_sam_checkpoint,
                                                                                 tmp_path, capsys):
    """Issue 24's whole loop on one multi-dataset output: two runs trained on the mixture, one validating
    on refcocog/val as it trains; one `svp eval` of both over all eight splits, the same under two
    processes as under one."""
    import subprocess
    import sys

    from train_helpers import train_flags

    from jobs.eval import main as svp_eval
    from jobs.train import main as svp_train

    runs = [tmp_path / "svp", tmp_path / "mlp"]
    mixture = ["--train-splits", "refcoco/train,refcoco+/train,refcocog/train:2", "--max-steps", "2"]
    assert svp_train([*train_flags(multi_out, runs[0], tiny_sam_checkpoint, *mixture), "--eval-every", "1",
                      "--eval-splits", "refcocog/val", "--export", "best"]) == 0
    best = json.loads((runs[0] / "checkpoints" / "best.json").read_text())
    assert best["splits"] == ["refcocog/val"] and best["step"] in (1, 2)
    assert (runs[0] / "checkpoints" / "best" / "model.safetensors").is_file()
    assert svp_train([*train_flags(multi_out, runs[1], tiny_sam_checkpoint, *mixture), "--projector", "mlp"]) == 0

    recipe = tmp_path / "eval.yaml"
    recipe.write_text(json.dumps({"run_dirs": ",".join(map(str, runs)), "shards": str(multi_out), "batch_size": 2}))
    one, two = tmp_path / "one" / "eval.json", tmp_path / "two" / "eval.json"
    assert svp_eval(["--config", str(recipe), "--out", str(one)]) == 0
    splits = ["refcoco/val", "refcoco/testA", "refcoco/testB", "refcoco+/val", "refcoco+/testA", "refcoco+/testB",
              "refcocog/val", "refcocog/test"]
    header = one.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert header == ["run", "projector", *(f"cIoU {s}" for s in splits), *(f"gIoU {s}" for s in splits),
                      "tokens/image"]
    assert "cIoU refcocog/test" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "jobs.eval",
                             "--config", str(recipe), "--out", str(two)], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert one.with_suffix(".csv").read_text() == two.with_suffix(".csv").read_text()
    for single, double in zip(*(json.loads(path.read_text())["runs"] for path in (one, two)), strict=True):
        assert list(single["splits"]) == splits
        for split in splits:
            assert {k: v for k, v in double["splits"][split].items() if k != "samples_per_s"} == {
                k: v for k, v in single["splits"][split].items() if k != "samples_per_s"}
