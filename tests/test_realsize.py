"""Real-size architectures, saved as the hub ships them, through the commands a user types.

A Qwen2.5-0.5B-shaped LLM (bf16 safetensors, Qwen2Tokenizer with its chat template), DINOv2-base
(with its image processor) and an official-format SAM ViT-B ``.pth``: ``svp precompute`` stores the
ViT-B embeddings, then ``svp train`` (fp32 and bf16), ``--resume``, the strict reload of the export,
``svp eval`` and ``svp predict``. Random weights, so the figures say nothing of accuracy; what is
checked is that every step of the real-size path runs and is faithful.

All of it is marked ``realsize`` (``pytest -m realsize``); the Llama-3.2-1B-sized LLM and full-size
CLIP ViT-L/14-336 are also ``heavy``, left out of ``make test`` (minutes and ~10 GB more).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import export_tensors

from bench import hub_models
from bench.common import save_random_sam

pytestmark = [pytest.mark.realsize, pytest.mark.timeout(1200)]  # builds and runs models of hundreds of MB


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {"llm": hub_models.save_qwen2(root / "qwen2.5-0.5b"), "vision": hub_models.save_dinov2(root / "dinov2-base"),
            "sam": save_random_sam(root / "sam_vit_b.pth", "vit_b")}


@pytest.fixture(scope="module")
def rs_root(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("refer-rs")
    synthesize(root, images=5, seed=3)  # train 2, val 1, testA 1, testB 1: ViT-B encodes each once
    return root


@pytest.fixture(scope="module")
def vit_b_shards(hub, rs_root, tmp_path_factory, ray_local) -> Path:
    """A few train and val images, with ViT-B's embeddings stored (training never runs its encoder)."""
    from jobs.precompute import main as precompute

    root, out = rs_root, tmp_path_factory.mktemp("shards-rs")
    assert precompute(["--refer-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out),
                       "--backend", "felzenszwalb", "--shard-size", "2", "--store-sam-embeddings",
                       "--sam-checkpoint", str(hub["sam"]), "--sam-model", "vit_b"]) == 0
    return out


def _train(hub, shards: Path, run: Path, *extra: str) -> int:
    from jobs.train import main as train

    return train(["--shards", str(shards), "--run-dir", str(run), "--llm", str(hub["llm"]),
                  "--vision", str(hub["vision"]),
                  "--sam-checkpoint", str(hub["sam"]), "--sam-model", "vit_b", "--batch-size", "2", "--log-every", "1",
                  "--warmup-steps", "0", *extra])


def test_hub_directories_are_what_from_pretrained_reads(hub):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(hub["llm"], local_files_only=True)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
            config.tie_word_embeddings, config.vocab_size) == ("qwen2", 896, 24, 2, True, 151936)
    assert config.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(hub["llm"], local_files_only=True)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.chat_template
    # The chat template's words are whole tokens, as in Qwen's own vocabulary: a prompt has its real length.
    assert [len(tokenizer.tokenize(word)) for word in ("system", "user", "assistant", " helpful")] == [1, 1, 1, 1]
    state = torch.load(hub["sam"], map_location="cpu", weights_only=True)
    assert "image_encoder.patch_embed.proj.weight" in state and state["image_encoder.pos_embed"].shape[-1] == 768


def test_real_size_train_resume_export_eval_predict(hub, rs_root, vit_b_shards, tmp_path, capsys):
    from jobs.eval import main as evaluate
    from jobs.predict import main as predict
    from trainer.export import load_exported_model
    from trainer.model import SegmentationMLLM

    run = tmp_path / "run"
    assert _train(hub, vit_b_shards, run, "--max-steps", "3", "--save-every", "2", "--optimizer", "adamw8bit") == 0
    printed = capsys.readouterr().out
    assert "llm           trainable" in printed  # the parameter table, at real size
    config = json.loads((run / "run_config.json").read_text())
    assert config["model"]["vision_size"] == 224  # DINOv2-base's processor crop, not its config's 518
    assert any("lora_A" in name for name in export_tensors(run / "export"))

    # The whole training state of the 0.5B LoRA svp run, 8-bit AdamW's moments included, is under 100 MB.
    checkpoint_bytes = sum(path.stat().st_size for path in (run / "checkpoints" / "step_000002").iterdir())
    assert checkpoint_bytes <= 100e6, checkpoint_bytes

    # Killed after step 2's save: --resume continues from there and trains step 3 again.
    shutil.rmtree(run / "checkpoints" / "step_000003")
    assert _train(hub, vit_b_shards, run, "--max-steps", "3", "--resume", "--optimizer", "adamw8bit") == 0
    assert "resumed from" in capsys.readouterr().out and (run / "checkpoints" / "step_000003").is_dir()
    at_step_2 = load_file(str(run / "checkpoints" / "step_000002" / "model.safetensors"))
    at_step_3 = load_file(str(run / "checkpoints" / "step_000003" / "model.safetensors"))
    assert any(not torch.equal(at_step_3[name], at_step_2[name]) for name in at_step_3)

    # The export reloads strictly into a model rebuilt from the same directories, and is the last step's.
    model = load_exported_model(run)
    assert isinstance(model, SegmentationMLLM)
    exported = model.trainable_state_dict()
    assert exported.keys() == at_step_3.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, at_step_3[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing keys"):
        model.load_trainable_state_dict({k: v for k, v in exported.items() if "lora_A" not in k})

    assert evaluate(["--run-dir", str(run), "--shards", str(vit_b_shards), "--splits", "val", "--batch-size", "2"]) == 0
    report = json.loads((run / "eval.json").read_text())["runs"][0]
    assert 0.0 <= report["splits"]["val"]["ciou"] <= 1.0 and report["splits"]["val"]["samples"] > 0

    image = next(rs_root.rglob("*.jpg"))
    overlay = tmp_path / "overlay.png"
    assert predict(["--run-dir", str(run), "--image", str(image), "--text", "the red circle",
                    "--out", str(overlay)]) == 0
    assert overlay.stat().st_size > 0


def test_real_size_bf16_mixed_precision(hub, vit_b_shards, tmp_path):
    """bf16 in a process of its own, as a user runs it (Accelerate's precision is fixed per process)."""
    run = tmp_path / "bf16"
    command = [sys.executable, "-m", "jobs.train", "--shards", str(vit_b_shards), "--run-dir", str(run),
               "--llm", str(hub["llm"]), "--vision", str(hub["vision"]), "--sam-checkpoint", str(hub["sam"]),
               "--sam-model", "vit_b", "--batch-size", "2", "--max-steps", "1", "--mixed-precision", "bf16"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "run_config.json").read_text())["mixed_precision"] == "bf16"
    saved = export_tensors(run / "export")
    assert saved and all(torch.isfinite(t.float()).all() for t in saved.values())


def _stored_features(hub, rs_root: Path, out: Path, vision: Path, *size: str) -> list[bytes]:
    """Precompute ``rs_root`` storing ``vision``'s features (classical superpixels, no SAM): each image's vision.npy."""
    import webdataset as wds

    from jobs.precompute import main as precompute

    assert precompute(["--refer-root", str(rs_root), "--dataset", "refcoco", "--out", str(out), "--backend",
                       "felzenszwalb", "--store-vision-features", "--vision", str(vision), *size]) == 0
    return [sample["vision.npy"] for tar in sorted(out.glob("*.tar"))
            for sample in wds.WebDataset(str(tar), shardshuffle=False)]


def test_real_size_training_on_stored_dinov2_base_features(hub, rs_root, tmp_path, capsys, ray_local):
    """DINOv2-base at its 224 crop: 256 patches × 768 channels in float16 per image (384 KiB, README),
    read by a real-size run instead of running the encoder."""
    from pipeline.shards import decode_stored_array

    out = tmp_path / "featured"
    stored = _stored_features(hub, rs_root, out, hub["vision"])
    assert stored and {decode_stored_array(data).shape for data in stored} == {(256, 768)}
    assert {len(data) - 128 for data in stored} == {384 * 1024}  # an .npy header is 128 bytes
    assert _train(hub, out, tmp_path / "run", "--max-steps", "1") == 0
    assert "read from the shards instead of encoded at each step: vision.npy" in capsys.readouterr().out


@pytest.mark.heavy
def test_dinov2_large_at_448_stores_2_mib_per_image(hub, rs_root, tmp_path, ray_local):
    """DINOv2-large at 448: 1024 patches × 1024 channels in float16 per image (2 MiB, README)."""
    from pipeline.shards import decode_stored_array

    large = hub_models.save_dinov2(tmp_path / "dinov2-large", **hub_models.DINOV2_LARGE)
    stored = _stored_features(hub, rs_root, tmp_path / "featured", large, "--vision-size", "448")
    assert stored and {decode_stored_array(data).shape for data in stored} == {(1024, 1024)}
    assert {len(data) - 128 for data in stored} == {2 * 1024 * 1024}


@pytest.mark.heavy
def test_llama_1b_with_clip_336_all_linear_lora_and_gradient_checkpointing(vit_b_shards, hub, tmp_path):
    """A Llama-3.2-1B-shaped base LLM (no pad token, no chat template) and full-size CLIP ViT-L/14-336,
    with LoRA on every linear layer and gradient checkpointing: the LLaVA-style stack."""
    llama = hub_models.save_llama(tmp_path / "llama-3.2-1b")
    clip = hub_models.save_clip(tmp_path / "clip-vit-large-patch14-336")
    run = tmp_path / "run"
    stack = {**hub, "llm": llama, "vision": clip}
    assert _train(stack, vit_b_shards, run, "--max-steps", "1", "--projector", "mlp", "--lora-targets", "all-linear",
                  "--gradient-checkpointing") == 0
    config = json.loads((run / "run_config.json").read_text())["model"]
    assert config["vision_size"] == 336 and config["lora_targets"] == ["all-linear"]
    saved = export_tensors(run / "export")
    assert any("gate_proj.lora_A" in name for name in saved) and any("k_proj.lora_A" in name for name in saved)
