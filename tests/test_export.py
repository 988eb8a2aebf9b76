"""svp export: the LLM's LoRA as a PEFT adapter that plain peft loads to svp's logits, svp's trained
parts beside it, a model card, and svp predict / eval from the export alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.eval import main as svp_eval
from jobs.export import main as svp_export
from jobs.predict import main as svp_predict
from pipeline.hashing import path_sha256
from trainer.checkpoint import CheckpointError
from trainer.export import load_exported_model, write_export
from trainer.model import ModelConfig, SegmentationMLLM
from trainer.model.mllm import tiny_causal_lm
from trainer.model.token_rows import embed_tokens, token_logits
from trainer.model.tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
V = 112  # the tiny vision encoder at 112 px: 8 x 8 patches


@pytest.fixture(scope="module")
def base_llm(tmp_path_factory) -> Path:
    """The tests' tiny LLM, saved as the hub ships a model: a directory that --llm and transformers both read."""
    path = tmp_path_factory.mktemp("tiny-llm")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    tiny_causal_lm(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _exported(base_llm: Path, out: Path) -> SegmentationMLLM:
    """A model on ``base_llm`` with every trained tensor moved off its initial value, exported into ``out``
    as if by a run (LoRA's B starts at zero: an untouched adapter would change no logit)."""
    model = SegmentationMLLM(ModelConfig(llm=str(base_llm), vision_size=V)).eval()
    with torch.no_grad():
        for param in model.trainable_state_dict().values():
            param.add_(0.2 * torch.randn_like(param))
    run_dir = out.parent / "run"
    run_dir.mkdir()
    record = {"model": json.loads(json.dumps(asdict(model.config))), "data": {"train": {"config": {
        "dataset": "refcoco", "backend": "felzenszwalb"}}}, "max_steps": 1}
    (run_dir / "run_config.json").write_text(json.dumps(record))
    write_export(model, run_dir, out, "last", 1)
    return model


def test_the_adapter_loads_with_plain_peft_and_gives_svp_s_logits(base_llm, tmp_path):
    out = tmp_path / "export"
    model = _exported(base_llm, out)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (out / "llm").iterdir()}

    tokenizer = AutoTokenizer.from_pretrained(out / "llm")
    base = AutoModelForCausalLM.from_pretrained(base_llm)
    base.resize_token_embeddings(len(tokenizer))  # new rows drawn at random: the adapter must carry them
    plain = PeftModel.from_pretrained(base, out / "llm").eval()
    ids = torch.tensor([[2, 9, 14, model.seg_id, model.image_id, 7, 30]])
    assert tokenizer.convert_ids_to_tokens([model.seg_id, model.image_id]) == ["[SEG]", "<image>"]
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
        llm = model.causal_lm()  # svp's own path: its embedding and LM head with the trained token rows
        hidden = llm.get_decoder()(inputs_embeds=embed_tokens(llm.get_input_embeddings(), ids)).last_hidden_state
        ours = token_logits(llm.get_output_embeddings(), hidden)
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert config["sources"]["llm"] == {"name": str(base_llm), "sha256": path_sha256(base_llm)}
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(base_llm) and card.data.library_name == "peft"
    assert card.data.datasets == ["refcoco"] and "PeftModel.from_pretrained" in card.text

    # svp reads it back exactly, and refuses it once the base LLM it names has other bytes
    loaded = load_exported_model(out).trainable_state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in model.trainable_state_dict().items())
    changed = tmp_path / "changed"
    shutil.copytree(base_llm, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    config["sources"]["llm"]["name"] = config["model"]["llm"] = str(changed)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is not the one it was trained with"):
        load_exported_model(out)


def test_svp_export_predicts_and_evaluates_as_the_run_with_no_run_around_it(trained_run, shards, refer_root,
                                                                           tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval.json").unlink(missing_ok=True)
    assert svp_eval(["--run-dir", str(run), "--shards", str(shards), "--splits", "val", "--max-samples", "4"]) == 0
    out = tmp_path / "exported"
    assert svp_export(["--run-dir", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["trained"] == {"run_dir": str(run), "checkpoint": "last", "step": 3,
                                 "git_commit": json.loads((run / "run_config.json").read_text())["git_commit"]}
    card = ModelCard.load(out / "README.md")
    assert "cIoU val" in card.text and '"max_steps": 3' in card.text and "svp predict --run-dir DIR" in card.text

    image = sorted((refer_root / "images/mscoco/images/train2014").glob("*.jpg"))[0]
    masks = {}
    for name, source in (("run", run), ("export", out)):
        if name == "export":
            shutil.rmtree(run)  # the export alone, nothing of the run beside it
        assert svp_predict(["--run-dir", str(source), "--image", str(image), "--text", "the red circle", "--out",
                            str(tmp_path / f"{name}.png"), "--mask-out", str(tmp_path / f"{name}-mask.png")]) == 0
        masks[name] = Image.open(tmp_path / f"{name}-mask.png").tobytes()
    assert masks["run"] == masks["export"]
    assert svp_eval(["--run-dir", str(out), "--shards", str(shards), "--splits", "val", "--max-samples", "4"]) == 0
    assert json.loads((out / "eval.json").read_text())["runs"][0]["splits"]["val"]["samples"] > 0


def test_export_refuses_a_missing_run_or_checkpoint(trained_run, tmp_path, capsys):
    assert svp_export(["--run-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "svp export: error:" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained_run / "run_config.json", empty / "run_config.json")
    assert svp_export(["--run-dir", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert svp_export(["--run-dir", str(trained_run), "--out", str(tmp_path / "out"), "--checkpoint", "best"]) == 2
    assert "has no best checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "-m", "jobs.export", "--run-dir", str(tmp_path / "nowhere"), "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "svp export: error:" in result.stderr
