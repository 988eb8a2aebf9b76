"""One image + one expression → a mask, and an overlay a person can look at."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from trainer.data import DataConfig, sam_inputs, vision_inputs

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)


@torch.no_grad()
def predict_mask(model: torch.nn.Module, rgb: np.ndarray, superpixels: np.ndarray, text: str) -> tuple[np.ndarray, int]:
    """(H, W) bool mask for ``text`` on ``rgb`` (superpixels from the same backend the model trained on),
    and the number of visual tokens the LLM saw."""
    config = DataConfig(**model.data_config_fields())
    pixel_values, labels, count = vision_inputs(rgb, superpixels, config)
    sam_pixels, input_size = sam_inputs(rgb, config)
    batch = {
        "pixel_values": pixel_values[None], "superpixels": labels[None],
        "num_superpixels": torch.as_tensor([count]), "sentences": [text], "sam_pixels": sam_pixels[None],
        "input_sizes": torch.as_tensor([input_size]), "original_sizes": torch.as_tensor([rgb.shape[:2]]),
    }
    logits, tokens = model.predict_masks(batch)
    full = model.mask_head.postprocess(logits, batch["input_sizes"], batch["original_sizes"])[0]
    return (full.squeeze(0) > 0).cpu().numpy(), int(tokens[0])


def render_overlay(rgb: np.ndarray, mask: np.ndarray, text: str, alpha: float = 0.5) -> Image.Image:
    """The image with the mask tinted red and the expression written on a band above it."""
    tinted = rgb.astype(np.float32)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * OVERLAY_COLOUR
    picture = Image.fromarray(tinted.clip(0, 255).astype(np.uint8))
    font = ImageFont.load_default(size=max(12, rgb.shape[1] // 30))
    band = max(20, int(font.size * 1.8))
    canvas = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    canvas.paste(picture, (0, band))
    ImageDraw.Draw(canvas).text((6, band // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas
