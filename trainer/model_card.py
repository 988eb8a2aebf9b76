"""The model card of an export (its ``README.md``): Hugging Face front matter, so that the Hub files
and finds it, and a body written from the run itself, so that what it says cannot drift from what
was trained: the parts and their sources, visual tokens per image, the eval table when the run was
evaluated, the recipe, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from pipeline.vision_model import TINY
from trainer.evaluate import paper_markdown

# Left out of the card's recipe: what the run read (every shard's sha256) and ran on, not what it was told.
_NOT_RECIPE = ("data", "libraries", "git_commit")


def model_card(config: dict[str, Any], run_config: dict[str, Any], evaluation: dict[str, Any] | None,
               patches: int) -> ModelCard:
    """The card of an export whose ``config.json`` is ``config``, trained by the run of ``run_config``;
    ``evaluation``: the run's ``eval.json``, if any; ``patches``: the vision encoder's patches per image."""
    model = config["model"]
    projector = model["projector"]["kind"]
    datasets = sorted({*str(config["superpixels"].get("dataset", "")).split(",")} - {""})
    data = ModelCardData(
        base_model=model["llm"] if model["llm"] != TINY else None,
        library_name="peft" if model["llm_training"] == "lora" else "transformers",
        tags=["svp", "referring-image-segmentation", "image-segmentation", f"projector-{projector}", "sam"],
        datasets=datasets or None, metrics=["ciou", "giou"],
    )
    trained = config["trained"]
    body = [
        f"# svp: {projector} projector, {model['llm']}",
        "",
        "Referring image segmentation: an LLM reads the expression and the image's visual tokens, and its "
        "`[SEG]` state prompts SAM's mask decoder. Exported from the run "
        f"`{trained['run_dir']}` ({trained['checkpoint']} checkpoint, step {trained['step']}, "
        f"commit {trained['git_commit']}).",
        "",
        "## Parts",
        "",
        *_parts(config),
        "",
        "## Visual tokens per image",
        "",
        _tokens(model, patches, evaluation),
        "",
        "## Evaluation",
        "",
        paper_markdown(evaluation["runs"]) if evaluation else
        "Not evaluated: `svp eval --run-dir DIR --shards SHARDS` writes the table.",
        "## Recipe",
        "",
        "The training config (`svp train --config` takes it as it is):",
        "",
        "```json",
        json.dumps({k: v for k, v in run_config.items() if k not in _NOT_RECIPE}, indent=2, sort_keys=True),
        "```",
        "",
        "## How to load",
        "",
        "```bash",
        "svp predict --run-dir DIR --image photo.jpg --text 'the man on the left' --out overlay.png",
        "svp eval --run-dir DIR --shards SHARDS",
        "```",
        "",
        *_plain_llm(model),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def write_model_card(out: Path, config: dict[str, Any], run_config: dict[str, Any],
                     evaluation: dict[str, Any] | None, patches: int) -> Path:
    """:func:`model_card` as ``out/README.md``."""
    path = out / "README.md"
    model_card(config, run_config, evaluation, patches).save(path)
    return path


def _parts(config: dict[str, Any]) -> list[str]:
    model, sources = config["model"], config["sources"]

    def named(key: str) -> str:
        source = sources[key]
        return f"`{source['name']}`" + (f" (sha256 `{source['sha256']}`)" if source["sha256"] else "")

    llm = (f"LoRA r={model['lora_r']}, alpha {model['lora_alpha']} on {', '.join(model['lora_targets'])}, and the "
           "rows of `[SEG]` and `<image>`: a PEFT adapter in `llm/`" if model["llm_training"] == "lora"
           else "every weight trained: the whole LLM in `llm/`")
    return [
        f"- LLM: {named('llm')}; {llm}, with its tokenizer.",
        f"- vision encoder (frozen): {named('vision')} at {model['vision_size']} px.",
        f"- SAM `{model['sam_model']}`: {named('sam_checkpoint')}; its image encoder frozen, its mask decoder "
        "trained.",
        "- `svp.safetensors`: the projector, the `[SEG]` MLP, the region prompt and SAM's mask decoder.",
        f"- superpixels of the training shards: `{config['superpixels'].get('backend', 'unrecorded')}` "
        "(`svp predict` makes the same for a new image).",
    ]


def _tokens(model: dict[str, Any], patches: int, evaluation: dict[str, Any] | None) -> str:
    kind = model["projector"]["kind"]
    fixed = {"mlp": f"{patches}, one per patch of the vision encoder.",
             "pool": f"{model['projector']['pool_tokens']}, pooled from the vision encoder's patches."}
    line = fixed.get(kind, "one per SAM superpixel of the image: as many as the image has regions.")
    if evaluation:
        means = ", ".join(f"{split} {result['tokens_mean']:.1f}" for report in evaluation["runs"]
                          for split, result in report["splits"].items())
        line += f" Mean per split in the evaluation: {means}."
    return line


def _plain_llm(model: dict[str, Any]) -> list[str]:
    """How to load the LLM with transformers (and peft) alone. An adapter on svp's random ``tiny``
    base has no base to load it on outside svp (which rebuilds it from the seed in ``config.json``)."""
    if model["llm_training"] == "full":
        load = ["model = AutoModelForCausalLM.from_pretrained('DIR/llm')"]
    elif model["llm"] == TINY:
        return ["The adapter's base is svp's random `tiny` LLM, rebuilt from the seed in `config.json`: load this "
                "export with svp."]
    else:
        load = [f"base = AutoModelForCausalLM.from_pretrained('{model['llm']}', dtype='auto')",
                "if len(tokenizer) > base.get_input_embeddings().num_embeddings:",
                "    base.resize_token_embeddings(len(tokenizer))",
                "model = PeftModel.from_pretrained(base, 'DIR/llm')"]
    return [
        "The LLM alone, with transformers and peft (the same logits as svp's):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tokenizer = AutoTokenizer.from_pretrained('DIR/llm')",
        *load,
        "```",
    ]
